""".litertlm: the bundle Google's LiteRT-LM engine (Android, iOS, desktop) runs.

One file holding the exported .tflite (as the engine's `prefill_decode`
model), the SentencePiece model, and an LlmMetadata proto: BOS as the start
token, the stop ids, Gemma's user/model turn affixes (the engine renders chat
turns itself), the cache length as `max_num_tokens`, and a generic model type
(the engine has no Gemma 2 type; generic runs any model with this contract).
This export's JSON description rides along as system metadata.

Written with `litert-lm-builder` (PyPI; the export extra installs it).
"""

import contextlib
import io
import json
import os
import struct

from keras_gemma2.tokenizer import Gemma2Tokenizer

# The system-metadata key under which the export's JSON description is stored.
METADATA_KEY = "keras_gemma2_export"

# The file's fixed header: magic, three uint32 version numbers, then at byte 24 a
# uint64 giving where the section table (a flatbuffer from byte 32) ends.
MAGIC = b"LITERTLM"
_TABLE_END_AT, _TABLE_BEGIN = 24, 32


def _builder():
    try:
        from litert_lm_builder import litertlm_builder
        from litert_lm_builder.runtime.proto import llm_metadata_pb2
    except ImportError as error:
        raise ImportError(
            "A .litertlm export needs litert-lm-builder: pip install litert-lm-builder "
            "(or keras-gemma2[export])."
        ) from error
    return litertlm_builder, llm_metadata_pb2


def check_available():
    """Raise ImportError with the fix now, before an export starts tracing."""
    _builder()


def llm_metadata(description):
    """The LlmMetadata proto of an export described by `description` (signatures.metadata)."""
    _, llm_metadata_pb2 = _builder()
    proto = llm_metadata_pb2.LlmMetadata()
    proto.start_token.token_ids.ids.append(description["bos_token_id"])
    for stop_id in description["stop_token_ids"]:
        proto.stop_tokens.add().token_ids.ids.append(stop_id)
    template = Gemma2Tokenizer.chat_format()
    opening, closing = template["turn"].split("{content}")
    for role in ("user", "model"):
        affixes = getattr(proto.prompt_templates, role)
        affixes.prefix = opening.format(role=role)
        affixes.suffix = closing
    proto.max_num_tokens = description["cache_length"]
    proto.llm_model_type.generic_model.SetInParent()
    return proto


def write_bundle(tflite_path, tokenizer_path, description, output_path):
    """Write the .litertlm at `output_path` from the model, tokenizer and export description."""
    litertlm_builder, _ = _builder()
    proto_path = output_path + ".llm_metadata.pb"
    with open(proto_path, "wb") as f:
        f.write(llm_metadata(description).SerializeToString())
    try:
        builder = litertlm_builder.LitertLmFileBuilder()
        builder.add_system_metadata(litertlm_builder.Metadata(
            key=METADATA_KEY, value=json.dumps(description), dtype=litertlm_builder.DType.STRING,
        ))
        with contextlib.redirect_stdout(io.StringIO()):  # the builder prints this option
            builder.add_tflite_model(  # float32 activations: the engine's CPU default is float16
                tflite_path, litertlm_builder.TfLiteModelType.PREFILL_DECODE, prefer_activation_type="fp32"
            )
        builder.add_sentencepiece_tokenizer(tokenizer_path)
        builder.add_llm_metadata(proto_path)
        with open(output_path, "wb") as f:
            builder.build(f)
    finally:
        os.remove(proto_path)


def check_bundle(path):
    """{section type name: (begin, end)} of a whole bundle, or ValueError naming the problem and the fix.

    The engine trusts the header: a file cut short (an interrupted copy or
    download) aborted the whole process in a native check. So the header and
    every section's byte range are read here, against the file's size, first.
    Without litert-lm-builder's schema only the fixed header is checked ({}).
    """
    size = os.path.getsize(path)
    again = "copy or export it again (keras-gemma2 export --preset NAME model.litertlm)"
    with open(path, "rb") as f:
        head = f.read(_TABLE_BEGIN)
        if len(head) < _TABLE_BEGIN or not head.startswith(MAGIC):
            raise ValueError(f"{path} is not a LiteRT-LM bundle (it does not start with the {MAGIC.decode()} "
                             f"header; {size:,} bytes); {again}.")
        table_end = struct.unpack_from("<Q", head, _TABLE_END_AT)[0]
        if not _TABLE_BEGIN < table_end <= size:
            raise ValueError(f"{path} is cut short or damaged: its header ends at byte {table_end:,} but the "
                             f"file has {size:,} bytes; {again}.")
        table = f.read(table_end - _TABLE_BEGIN)
    try:
        sections = _sections(table)
    except Exception as error:  # noqa: BLE001 - garbage bytes fail anywhere in the flatbuffer reader
        raise ValueError(f"{path} is damaged: its section table cannot be read ({type(error).__name__}); "
                         f"{again}.") from None
    if sections is None:
        return {}
    if not sections:
        raise ValueError(f"{path} holds no sections (no model, no tokenizer); {again}.")
    for index, (_, begin, end) in enumerate(sections):
        if not table_end <= begin <= end <= size:
            raise ValueError(f"{path} is cut short or damaged: section {index} spans bytes {begin:,}-{end:,} "
                             f"but the file has {size:,} bytes; {again}.")
    return {kind: (begin, end) for kind, begin, end in sections}


def _sections(table):
    """[(type name, begin, end)] of each section in the section-table flatbuffer (None: no reader).

    Read with litert-lm-builder's generated schema (installed beside the
    engine by the export extra).
    """
    try:
        from litert_lm_builder import litertlm_header_schema_py_generated as schema
    except ImportError:
        return None
    names = {value: name for name, value in vars(schema.AnySectionDataType).items() if not name.startswith("_")}
    sections = schema.LiteRTLMMetaData.GetRootAs(table, 0).SectionMetadata()
    if sections is None:
        return []
    found = []
    for i in range(sections.ObjectsLength()):
        section = sections.Objects(i)
        found.append((names.get(section.DataType(), "unknown"), section.BeginOffset(), section.EndOffset()))
    return found


def read_contract(path, sections):
    """(tokenizer, cache length) from a checked bundle's sections; (None, None) where one is missing."""
    def read(kind):
        if kind not in sections:
            return None
        begin, end = sections[kind]
        with open(path, "rb") as f:
            f.seek(begin)
            return f.read(end - begin)

    tokenizer_bytes, metadata_bytes = read("SP_Tokenizer"), read("LlmMetadataProto")
    tokenizer = Gemma2Tokenizer(tokenizer_bytes) if tokenizer_bytes else None
    cache_length = None
    if metadata_bytes:
        _, llm_metadata_pb2 = _builder()
        proto = llm_metadata_pb2.LlmMetadata()
        proto.ParseFromString(metadata_bytes)
        cache_length = proto.max_num_tokens or None
    return tokenizer, cache_length
