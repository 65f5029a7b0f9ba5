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

from keras_gemma2.tokenizer import Gemma2Tokenizer

# The system-metadata key under which the export's JSON description is stored.
METADATA_KEY = "keras_gemma2_export"


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
