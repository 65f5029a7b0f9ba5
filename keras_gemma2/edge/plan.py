"""Export's plan: the formats, quantizations and defaults, and the checked arguments.

Everything an export needs is validated here, before any tracing; the CLI's
`export` command takes its defaults and help texts from this module.
"""

import dataclasses
import os

import keras
import numpy as np

from keras_gemma2.edge import litertlm_bundle
from keras_gemma2.io.atomic import probe_write
from keras_gemma2.model import lora
from keras_gemma2.model.quantization import quantization_modes

FORMATS = ("litertlm", "litert", "saved_model")
# The file suffix of each file format (a SavedModel is a directory).
SUFFIXES = {".litertlm": "litertlm", ".tflite": "litert"}
QUANTIZATIONS = (None, "int8", "int4")
# export()'s and the CLI's defaults (None lengths: derived from the model by export_lengths).
DEFAULT_FORMAT = None  # from the path's suffix (format_of)
DEFAULT_QUANTIZATION = None  # float32
DEFAULT_CACHE_LENGTH = 1024
DEFAULT_PREFILL_LENGTHS = (32, 128, 512)
# What export_lengths derives, for help texts (the CLI's --cache-length / --prefill-lengths).
CACHE_LENGTH_TEXT = f"min({DEFAULT_CACHE_LENGTH}, the model's context length)"
PREFILL_LENGTHS_TEXT = (
    f"those of {' '.join(map(str, DEFAULT_PREFILL_LENGTHS))} that fit the cache, "
    "or the cache length if none does"
)
# The help of each export argument, its default stated (the CLI's `export` options use these).
HELP = {
    "path": (
        "a .litertlm bundle (LiteRT-LM, the phone runtime), a .tflite file (the plain LiteRT "
        "interpreter) or a new directory (saved_model)"
    ),
    "format": f"{' or '.join(FORMATS)} (default: from the path's suffix)",
    "quantization": (
        f"{' or '.join(q for q in QUANTIZATIONS if q)} "
        f"(default: {DEFAULT_QUANTIZATION or 'none, float32'})"
    ),
    "embedding_quantization": (
        "a .litertlm / .tflite's token table (lookup and tied output projection): int8 or int4 "
        "(default: as --quantization)"
    ),
    "cache_length": f"positions the KV cache holds, prompt plus generated tokens (default: {CACHE_LENGTH_TEXT})",
    "prefill_lengths": f"static prompt buckets, each at most the cache length (default: {PREFILL_LENGTHS_TEXT})",
}
METADATA_NAME = "keras_gemma2_export.json"


@dataclasses.dataclass(frozen=True)
class ExportPlan:
    """Checked export arguments (everything is validated before any tracing)."""

    path: str
    format: str
    quantization: object
    cache_length: int
    prefill_lengths: tuple
    # LiteRT: the token table's quantization (lookup and tied projection), None when float.
    embedding_quantization: object = None


def export_lengths(config, cache_length=None, prefill_lengths=None):
    """(cache_length, prefill_lengths) with the unset ones derived from the model's `config`.

    The one place export's defaults are decided (export(), export_preset and the
    CLI use it): the cache holds min(1024, max_sequence_length) positions, so a
    512-context model exports with its defaults; the buckets are the default ones
    that fit that cache, or the cache length itself when none does. Given values
    are returned as they are (plan_export checks them).
    """
    if cache_length is None:
        cache_length = min(DEFAULT_CACHE_LENGTH, config.max_sequence_length)
    if prefill_lengths is None:
        fitting = isinstance(cache_length, (int, np.integer)) and not isinstance(cache_length, bool)
        prefill_lengths = tuple(p for p in DEFAULT_PREFILL_LENGTHS if fitting and p <= cache_length)
        prefill_lengths = prefill_lengths or (cache_length,)
    elif isinstance(prefill_lengths, list):
        prefill_lengths = tuple(prefill_lengths)
    return cache_length, prefill_lengths


def plan_export(model, path, format, quantization, cache_length, prefill_lengths, embedding_quantization=None):
    """Validate every argument; raise ValueError naming the problem and the fix.

    `embedding_quantization`: None (the token table as `quantization`) or "int8" /
    "int4", for a LiteRT file with quantized blocks (e.g. int4 blocks, int8 table).
    """
    if not os.fspath(path):
        raise ValueError("The export path is empty: give the file to write, e.g. 'model.litertlm' "
                         "(LiteRT-LM bundle) or 'model.tflite' (LiteRT).")
    path = os.path.abspath(os.fspath(path))
    format = format_of(path, format)
    if quantization not in QUANTIZATIONS:
        raise ValueError(
            f"Unknown quantization {quantization!r}; use None (float32), 'int8' or 'int4'."
        )
    if embedding_quantization is not None and (
        embedding_quantization not in QUANTIZATIONS or format == "saved_model" or quantization is None
    ):
        raise ValueError(
            f"embedding_quantization={embedding_quantization!r}: use None, 'int8' or 'int4', with a "
            ".litertlm / .tflite export whose quantization is 'int8' or 'int4'."
        )
    if format == "saved_model":
        if os.path.exists(path):
            raise FileExistsError(f"{path} already exists; export will not overwrite a directory.")
    elif os.path.isdir(path):
        raise ValueError(f"{path} is a directory; give the {_suffix_of(format)} file's path.")
    _check_writable(os.path.dirname(path))

    config = model.config
    cache_length, prefill_lengths = export_lengths(config, cache_length, prefill_lengths)
    if isinstance(cache_length, bool) or not isinstance(cache_length, (int, np.integer)):
        raise ValueError(f"cache_length must be an integer, got {cache_length!r}.")
    if not 1 <= cache_length <= config.max_sequence_length:
        raise ValueError(
            f"cache_length {cache_length} is outside [1, {config.max_sequence_length}] "
            "(the model's context length); choose a smaller cache."
        )
    if isinstance(prefill_lengths, (int, np.integer)):
        prefill_lengths = (prefill_lengths,)
    prefill_lengths = tuple(prefill_lengths or ())
    if not prefill_lengths or any(
        isinstance(p, bool) or not isinstance(p, (int, np.integer)) or p < 1 for p in prefill_lengths
    ):
        raise ValueError(
            f"prefill_lengths must be positive integers, got {prefill_lengths!r}."
        )
    too_long = [int(p) for p in prefill_lengths if p > cache_length]
    if too_long:
        raise ValueError(
            f"Prefill buckets {too_long} exceed cache_length {cache_length}: a prompt must fit "
            "in the cache. Raise cache_length or drop those buckets."
        )
    if lora.lora_layers(model):
        raise ValueError(
            "This model has unmerged LoRA adapters; call model.merge_lora() before export "
            "(the exported graph has plain kernels only)."
        )
    quantized = quantization_modes(model.backbone)
    if quantized:
        if format != "saved_model":
            raise ValueError(
                f"This model was quantized in Keras ({', '.join(quantized)}); for LiteRT export the "
                "float model and pass quantization='int8' / 'int4' (the converter quantizes)."
            )
        if quantization not in (None, *quantized) or len(quantized) > 1:
            raise ValueError(
                f"This model is already quantized in Keras ({', '.join(quantized)}); export it "
                f"with quantization=None or {quantized[0]!r}."
            )
        if keras.backend.backend() != "tensorflow":
            raise ValueError(
                "A model quantized in Keras exports in a TensorFlow-backend process only; under "
                f"{keras.backend.backend()} export the float model with quantization="
                f"{quantized[0]!r} (the export process quantizes it)."
            )
        quantization = quantized[0]
    if format == "litertlm":
        litertlm_bundle.check_available()
        if getattr(model, "tokenizer", None) is None:
            raise ValueError(
                "A .litertlm bundle carries the tokenizer, and this model has none; load it with "
                "its tokenizer (from_preset) or export to .tflite (token ids in, logits out)."
            )
    return ExportPlan(
        path, format, quantization, int(cache_length), tuple(sorted({int(p) for p in prefill_lengths})),
        (embedding_quantization or quantization) if format != "saved_model" else None,
    )


def format_of(path, format=None):
    """The export format of `path`: `format` checked against the suffix, or read from it."""
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if format is not None and format not in FORMATS:
        raise ValueError(f"Unknown export format {format!r}; use one of {FORMATS} (or None: from the suffix).")
    if format == "saved_model":
        if suffix in SUFFIXES:
            raise ValueError(
                f"A SavedModel is a directory, not a {suffix} file: {path!r}. "
                f"Use format={SUFFIXES[suffix]!r} or a directory path."
            )
        return format
    if suffix not in SUFFIXES:
        raise ValueError(
            f"Unknown export suffix {suffix or '(none)'!r} in {path!r}: end the path in .litertlm "
            "(LiteRT-LM bundle) or .tflite (LiteRT), or pass format='saved_model' for a directory."
        )
    if format is not None and SUFFIXES[suffix] != format:
        raise ValueError(
            f"A {format} export is a {_suffix_of(format)} file; got {path!r}. "
            f"Use the {_suffix_of(format)} suffix or drop format= (the suffix decides)."
        )
    return SUFFIXES[suffix]


def _suffix_of(format):
    return next(suffix for suffix, name in SUFFIXES.items() if name == format)


def _check_writable(directory):
    try:
        os.makedirs(directory, exist_ok=True)
        probe_write(directory)
    except OSError as error:
        raise PermissionError(
            f"Cannot write the export to {directory}: {error.strerror or error}. "
            "Choose a writable directory."
        ) from error
