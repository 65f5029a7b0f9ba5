"""Edge export: LiteRT (.tflite) and SavedModel with prefill/decode signatures.

A phone app needs more than a logits graph: it prefills the prompt once, then
calls one decode step per token, carrying the KV cache between calls. The
artifact therefore has

* `prefill_{P}` for each prompt bucket P: `tokens` int32 [1, P] (the prompt
  at the start, anything after `length`), `length` int32 [] -> `logits`
  float32 [1, vocab] of the last prompt token and `cache_0..cache_{L-1}`;
* `decode`: `token` int32 [1, 1], `position` int32 [] (the token's index in
  the text) and the caches -> `logits` and the updated caches.

Both trace the same `kv_cache.prefill` / `kv_cache.decode` (and so the same
Gemma2Attention) as `Gemma2CausalLM.generate`. Layer l's cache is
[1, 2, kv_heads, slots_l, head_dim]: global layers hold `cache_length` slots,
sliding layers a ring of min(window, cache_length) slots (position p in slot
p % slots). Shapes are static and the ops are TFLite builtins only, so the
file runs in the plain `ai_edge_litert` interpreter (no Flex delegate).

The graph is traced on Keras' TensorFlow backend. A model loaded under JAX or
PyTorch is saved to a temporary preset and exported by a child process with
KERAS_BACKEND=tensorflow (a process has one Keras backend).
"""

import collections
import contextlib
import dataclasses
import os
import shutil
import subprocess
import sys
import time

import keras
import numpy as np

from keras_gemma2.model import kv_cache
from keras_gemma2.edge import litert_weights
from keras_gemma2 import tokenizer as tokenizer_module
from keras_gemma2.io.safetensors_files import write_json
from keras_gemma2.io.atomic import probe_write, staging_directory

FORMATS = ("litert", "saved_model")
QUANTIZATIONS = (None, "int8", "int4")
DEFAULT_CACHE_LENGTH = 1024
DEFAULT_PREFILL_LENGTHS = (32, 128, 512)
# What export_lengths derives, for help texts (the CLI's --cache-length / --prefill-lengths).
CACHE_LENGTH_TEXT = f"min({DEFAULT_CACHE_LENGTH}, the model's context length)"
PREFILL_LENGTHS_TEXT = (
    f"those of {' '.join(map(str, DEFAULT_PREFILL_LENGTHS))} that fit the cache, "
    "or the cache length if none does"
)
METADATA_NAME = "keras_gemma2_export.json"
# Hidden folders beside the output while an export runs (files.staging_directory).
STAGING_PREFIX = ".keras_gemma2-export-"
# Above this the flatbuffer's 2 GB limit needs weights stored after it (buffer offsets).
_LARGE_MODEL_BYTES = 1 << 30


@dataclasses.dataclass(frozen=True)
class ExportPlan:
    """Checked export arguments (everything is validated before any tracing)."""

    path: str
    format: str
    quantization: object
    cache_length: int
    prefill_lengths: tuple


def export(
    model,
    path,
    format="litert",
    quantization=None,
    cache_length=None,
    prefill_lengths=None,
    progress=None,
):
    """Export `model` (a Gemma2CausalLM) for on-device generation; returns the artifact path.

    `format`: "litert" (path ends in .tflite; the tokenizer and a metadata file
    are written beside it as `<stem>.tokenizer.model` / `<stem>.json`) or
    "saved_model" (path is a new directory; tokenizer and metadata inside).
    `quantization`: None (float32), "int8" or "int4". LiteRT: the converter's
    per-channel int8 weights with float activations / ai-edge-quantizer's
    channel-wise int4. SavedModel: the weights of a Keras-quantized copy of the
    model (`Gemma2CausalLM.quantize`), dequantized inside the graph.
    `cache_length`: positions the KV cache holds (prompt + generated tokens);
    None: min(1024, the model's context length).
    `prefill_lengths`: the static prompt buckets, each <= cache_length; None:
    those of (32, 128, 512) that fit the cache, or the cache length if none does
    (see `export_lengths`).
    `progress`: None (silent) or a callable `progress(stage, step, steps)`,
    called as step `step` of `steps` begins (an export of the 2B takes minutes).
    """
    plan = plan_export(model, path, format, quantization, cache_length, prefill_lengths)
    if keras.backend.backend() == "tensorflow" and model.backbone.compute_dtype == "float32":
        return _export_here(model.backbone, model.tokenizer, plan, _stop_ids(model), progress=progress)
    return _export_in_child(model, plan, progress)


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


def plan_export(model, path, format, quantization, cache_length, prefill_lengths):
    """Validate every argument; raise ValueError naming the problem and the fix."""
    from keras_gemma2.model import lora

    if format not in FORMATS:
        raise ValueError(f"Unknown export format {format!r}; use one of {FORMATS}.")
    if quantization not in QUANTIZATIONS:
        raise ValueError(
            f"Unknown quantization {quantization!r}; use None (float32), 'int8' or 'int4'."
        )
    path = os.path.abspath(os.fspath(path))
    if format == "litert" and not path.endswith(".tflite"):
        raise ValueError(f"A LiteRT export is a .tflite file; got {path!r}. Add the .tflite suffix.")
    if format == "saved_model":
        if path.endswith(".tflite"):
            raise ValueError(
                f"A SavedModel is a directory, not a .tflite file: {path!r}. "
                "Use format='litert' or a directory path."
            )
        if os.path.exists(path):
            raise FileExistsError(f"{path} already exists; export will not overwrite a directory.")
    elif os.path.isdir(path):
        raise ValueError(f"{path} is a directory; give the .tflite file's path.")
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
    quantized = sorted({
        str(layer.quantization_mode)
        for layer in model.backbone._flatten_layers(include_self=False)
        if getattr(layer, "quantization_mode", None)
    })
    if quantized:
        if format == "litert":
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
    return ExportPlan(
        path, format, quantization, int(cache_length), tuple(sorted({int(p) for p in prefill_lengths}))
    )


def _check_writable(directory):
    try:
        os.makedirs(directory, exist_ok=True)
        probe_write(directory)
    except OSError as error:
        raise PermissionError(
            f"Cannot write the export to {directory}: {error.strerror or error}. "
            "Choose a writable directory."
        ) from error


def _stop_ids(model):
    return [int(i) for i in model._default_stop_ids()]


# ---- the traced signatures (TensorFlow backend) -------------------------------
def build_signatures(backbone, cache_length, prefill_lengths, int8_lookup=False, template=False,
                     stage=None):
    """A tf.Module with `prefill_{P}` and `decode` tf.functions over the backbone's weights.

    The module holds the backbone's underlying tf.Variables (not the Keras
    layers): traced under a StatelessScope that maps each Keras variable to
    its tf.Variable, the graph reads plain variables, which the TFLite
    converter freezes into constants. `template=True` maps block l's variables
    to block l % 2's (see litert_weights): the module then holds the embedding
    and two blocks, whatever the depth.
    """
    import tensorflow as tf
    from keras import ops

    config = backbone.config
    windows = kv_cache.layer_windows(config)
    slots = kv_cache.cache_lengths(config, cache_length)
    keras_variables = list(backbone.variables)
    cache_specs = [
        tf.TensorSpec(kv_cache.cache_shape(config, 1, n), tf.float32, name=f"cache_{i}")
        for i, n in enumerate(slots)
    ]

    module = tf.Module()
    sources = litert_weights.template_sources(backbone) if template else keras_variables
    tf_variables = {}  # one tf.Variable per source (the template shares them across blocks)
    for source in sources:
        if id(source) not in tf_variables:
            tf_variables[id(source)] = (
                tf.Variable(source, trainable=False) if isinstance(source, np.ndarray) else source.value
            )
    module.weights = list(tf_variables.values())
    read = [tf_variables[id(source)] for source in sources]
    embedding = backbone.token_embedding
    if int8_lookup:
        # The token lookup reads an int8 copy (a row per token, dequantized on the fly);
        # the output projection keeps the float table for the converter to quantize.
        table, row_scale = litert_weights.quantize_rows(embedding.embeddings)
        module.lookup_table = tf.Variable(table, trainable=False, name="lookup_table")
        module.lookup_scale = tf.Variable(row_scale, trainable=False, name="lookup_scale")
        del table, row_scale

    @contextlib.contextmanager
    def scope():
        with keras.StatelessScope(state_mapping=list(zip(keras_variables, read))):
            if not int8_lookup:
                yield
                return
            embedding.int8_lookup = (module.lookup_table, module.lookup_scale)
            try:
                yield
            finally:
                embedding.int8_lookup = None

    def named(logits, caches):
        return {"logits": logits, **{f"cache_{i}": c for i, c in enumerate(caches)}}

    def make_prefill(bucket):
        @tf.function(
            input_signature=[
                tf.TensorSpec((1, bucket), tf.int32, name="tokens"),
                tf.TensorSpec((), tf.int32, name="length"),
            ]
        )
        def prefill(tokens, length):
            with scope():
                pad = bucket - length
                # Right-aligned (left-padded) prompt, as kv_cache.prefill expects.
                index = ops.arange(bucket, dtype="int32")
                aligned = ops.take(tokens, ops.mod(index - pad, bucket), axis=1)
                empty = [ops.zeros(kv_cache.cache_shape(config, 1, bucket), "float32") for _ in windows]
                logits, filled = kv_cache.prefill(
                    backbone, aligned, ops.reshape(pad, (1,)), empty, windows
                )
                # Slot s of a layer with n slots holds the latest position p <= length-1
                # with p % n == s (a ring when n < length); p < 0 is an empty slot.
                caches = []
                for cache, n in zip(filled, slots):
                    held = (length - 1) - ops.mod(length - 1 - ops.arange(n, dtype="int32"), n)
                    source = ops.clip(held + pad, 0, bucket - 1)
                    caches.append(ops.take(cache, source, axis=kv_cache.SLOT_AXIS))
                return named(logits, caches)

        return prefill

    @tf.function(
        input_signature=[
            tf.TensorSpec((1, 1), tf.int32, name="token"),
            tf.TensorSpec((), tf.int32, name="position"),
            *cache_specs,
        ]
    )
    def decode(token, position, *caches):
        with scope():
            no_padding = ops.zeros((1,), "int32")
            logits, caches = kv_cache.decode(
                backbone, token, no_padding, list(caches), position, windows
            )
            return named(logits, caches)

    signatures = {f"prefill_{p}": make_prefill(p) for p in prefill_lengths}
    signatures["decode"] = decode
    for name, function in signatures.items():
        setattr(module, name, function)
    concrete = {}
    for name, function in signatures.items():
        if stage:
            stage(f"tracing the {name} signature")
        concrete[name] = function.get_concrete_function()
    return module, concrete, slots


def metadata(backbone, tokenizer, plan, stop_ids, slots, files):
    config = backbone.config
    return {
        "format": plan.format,
        "quantization": plan.quantization,
        "files": files,
        "compute_dtype": "float32",
        "cache_dtype": "float32",
        "cache_length": plan.cache_length,
        "cache_slots": slots,
        "cache_shape": list(kv_cache.cache_shape(config, 1, None)),
        "prefill_lengths": list(plan.prefill_lengths),
        "signatures": {
            "prefill": {str(p): f"prefill_{p}" for p in plan.prefill_lengths},
            "decode": "decode",
        },
        "vocabulary_size": config.vocabulary_size,
        "bos_token_id": tokenizer.bos_token_id if tokenizer is not None else 2,
        "add_bos": True,
        "stop_token_ids": stop_ids,
        "chat_template": {
            # The same turn format as Gemma2Tokenizer.apply_chat_template.
            "turn": f"{tokenizer_module._START_OF_TURN}{{role}}\n{{content}}{tokenizer_module._END_OF_TURN}\n",
            "generation_prompt": f"{tokenizer_module._START_OF_TURN}model\n",
            "roles": dict(tokenizer_module._ROLE_ALIASES),
        },
        "config": config.to_dict(),
        "keras_gemma2_version": _version(),
    }


def _version():
    from keras_gemma2.version import __version__

    return __version__


def _export_here(backbone, tokenizer, plan, stop_ids, stitch=True, progress=None, stage=None):
    """Trace, save and (for LiteRT) convert in this TensorFlow-backend process.

    An int8 LiteRT export converts a two-block template and writes every
    block's own weights into it (`litert_weights`): the converter's memory
    then does not grow with depth. `stitch=False` converts the whole model
    directly (the reference the tests compare against).
    `progress(stage, step, steps)` (see export) hears of each stage; or
    `stage(name)`, a callable that does the numbering (export_preset's).
    """
    import tensorflow as tf

    parent = os.path.dirname(plan.path)
    stitched = stitch and plan.format == "litert" and plan.quantization == "int8"
    if stage is None:
        stage = _Steps(progress, _stage_count(plan, backbone, stitch))
    if _quantizes_a_copy(plan, backbone):
        stage(f"quantizing a copy of the model to {plan.quantization} in Keras")
        backbone = _quantized_copy(backbone, plan.quantization)
    staging = staging_directory(parent, STAGING_PREFIX)
    try:
        module, concrete, slots = build_signatures(
            backbone, plan.cache_length, plan.prefill_lengths,
            int8_lookup=plan.format == "litert" and plan.quantization is not None,
            template=stitched, stage=stage,
        )
        stage("saving the SavedModel")
        saved_model = os.path.join(staging, "saved_model")
        tf.saved_model.save(module, saved_model, signatures=concrete)
        signature_keys = list(concrete)
        del module, concrete
        stage("writing the tokenizer and metadata" if plan.format == "saved_model" else
              "converting to LiteRT (the longest step)")
        if plan.format == "saved_model":
            files = {"tokenizer": "tokenizer.model" if tokenizer is not None else None}
            if tokenizer is not None:
                tokenizer.save_assets(saved_model)
            write_json(
                os.path.join(saved_model, METADATA_NAME),
                metadata(backbone, tokenizer, plan, stop_ids, slots, files),
            )
            os.replace(saved_model, plan.path)
            return plan.path

        stem = os.path.basename(plan.path)[: -len(".tflite")]
        files = {
            "model": os.path.basename(plan.path),
            "tokenizer": f"{stem}.tokenizer.model" if tokenizer is not None else None,
        }
        staged_model = os.path.join(staging, files["model"])
        if stitched:
            template = os.path.join(staging, "template.tflite")
            convert_file(saved_model, template, signature_keys, plan.quantization, buffer_offsets=True)
            shutil.rmtree(saved_model)
            stage(f"writing each of the {backbone.config.num_layers} blocks' int8 weights")
            litert_weights.stitch(template, staged_model, backbone)
            os.remove(template)
        else:
            convert_file(saved_model, staged_model, signature_keys, plan.quantization)
        if plan.quantization == "int4":
            stage("quantizing the weights to int4 (ai-edge-quantizer)")
            quantize_int4(staged_model)
        stage("writing the tokenizer and metadata")
        if tokenizer is not None:
            os.replace(tokenizer.save_assets(staging), os.path.join(staging, files["tokenizer"]))
        write_json(
            os.path.join(staging, f"{stem}.json"),
            metadata(backbone, tokenizer, plan, stop_ids, slots, files),
        )
        # Sidecars first, the model last: a present .tflite means a complete export.
        for name in (files["tokenizer"], f"{stem}.json"):
            if name:
                os.replace(os.path.join(staging, name), os.path.join(parent, name))
        os.replace(staged_model, plan.path)
        return plan.path
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class _Steps:
    """Calls `progress(stage, step, steps)` for each stage begun; `progress=None` is silent."""

    def __init__(self, progress, steps):
        self.progress, self.steps, self.step = progress, steps, 0

    def __call__(self, stage):
        self.step += 1
        if self.progress is not None:
            self.progress(stage, self.step, max(self.steps, self.step))


def _stage_count(plan, backbone, stitch=True):
    """How many stages `_export_here` reports (the progress bar's length)."""
    count = int(_quantizes_a_copy(plan, backbone)) + len(plan.prefill_lengths) + 1  # + decode
    count += 2  # saving the SavedModel; then writing files (saved_model) or converting (litert)
    if plan.format == "litert":
        count += 1 + int(stitch and plan.quantization == "int8") + int(plan.quantization == "int4")
    return count


def _quantizes_a_copy(plan, backbone):
    return bool(plan.format == "saved_model" and plan.quantization and not _keras_quantized(backbone))


def _keras_quantized(backbone):
    return any(getattr(layer, "quantization_mode", None) for layer in backbone._flatten_layers())


def _quantized_copy(backbone, mode):
    """A Keras-quantized copy (the caller's model stays float)."""
    from keras_gemma2.model.backbone import Gemma2Backbone
    from keras_gemma2.causal_lm import Gemma2CausalLM

    copy = Gemma2Backbone.from_config(backbone.get_config())
    for target, source in zip(copy.variables, backbone.variables):
        target.assign(source)
    Gemma2CausalLM(copy).quantize(mode)
    return copy


def _directory_bytes(path):
    return sum(
        os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names
    )


def convert_file(saved_model_dir, output_path, signature_keys, quantization, buffer_offsets=False):
    """SavedModel -> .tflite; above 1 GB of weights in a child process.

    The converter never frees its constants (MLIR attributes), so a large
    conversion runs in a process of its own that returns all of it on exit.
    `buffer_offsets`: tensor data after the flatbuffer even for a small model
    (the layout of every large one), as the stitched export's template always is.
    """
    if _directory_bytes(saved_model_dir) <= _LARGE_MODEL_BYTES:
        weight_bytes = 1 << 62 if buffer_offsets else 0
        flatbuffer = convert_to_litert(saved_model_dir, signature_keys, quantization, weight_bytes)
        with open(output_path, "wb") as f:
            f.write(flatbuffer)
        return
    command = [
        sys.executable, "-c", "from keras_gemma2.edge.export import _convert_cli; _convert_cli()",
        saved_model_dir, output_path, str(quantization), *signature_keys,
    ]
    environment = {**os.environ, "KERAS_BACKEND": "tensorflow"}
    result = subprocess.run(command, env=environment, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError("The TFLite conversion process failed:\n" + result.stderr[-4000:])


def _convert_cli():
    saved_model_dir, output_path, quantization, *signature_keys = sys.argv[1:]
    quantization = None if quantization == "None" else quantization
    flatbuffer = convert_to_litert(saved_model_dir, signature_keys, quantization, 1 << 62)
    with open(output_path, "wb") as f:
        f.write(flatbuffer)


def convert_to_litert(saved_model_dir, signature_keys, quantization, weight_bytes):
    """SavedModel -> TFLite flatbuffer bytes with builtin ops only.

    int8 is the converter's dynamic-range quantization: per-channel int8
    weights, float32 activations (hybrid kernels). int4 is produced from the
    float file by `quantize_int4`.
    """
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(
        saved_model_dir, signature_keys=signature_keys
    )
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if quantization == "int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if weight_bytes > _LARGE_MODEL_BYTES:
        converter._experimental_use_buffer_offset = True  # weights after the 2 GB flatbuffer
    return converter.convert()


def quantize_int4(path):
    """Rewrite a float .tflite in place with int4 channel-wise weights (ai-edge-quantizer)."""
    try:
        from ai_edge_quantizer import quantizer, recipe
    except ImportError as error:
        raise ImportError(
            "int4 export needs ai-edge-quantizer: pip install ai-edge-quantizer "
            "(or keras-gemma2[export])."
        ) from error
    engine = quantizer.Quantizer(path, recipe.dynamic_wi4_afp32())
    result = engine.quantize(enable_progress_report=False)
    temporary = path + ".int4"
    result.export_model(temporary, overwrite=True)
    os.replace(temporary, path)


# ---- other backends: a TensorFlow child process ------------------------------
def _export_in_child(model, plan, progress=None):
    """Save the weights to a temporary preset; a KERAS_BACKEND=tensorflow child exports it.

    The child reports its stages on its output (`--progress`); they reach
    `progress` numbered on after this process's own.
    """
    stage = _Steps(progress, 2 + _stage_count(plan, model.backbone))  # + saving, + the child loading
    parent = os.path.dirname(plan.path)
    scratch = staging_directory(parent, STAGING_PREFIX)  # a full float copy of the weights
    try:
        stage("saving a float32 copy of the weights for a TensorFlow process")
        preset = os.path.join(scratch, "preset")
        model.save_to_preset(preset)
        command = [
            sys.executable, "-m", "keras_gemma2.edge.export", preset, plan.path,
            "--format", plan.format,
            "--cache-length", str(plan.cache_length),
            "--prefill-lengths", *[str(p) for p in plan.prefill_lengths],
            "--stop-ids", *[str(i) for i in _stop_ids(model)],
            "--progress",
        ]
        if plan.quantization:
            command += ["--quantization", plan.quantization]
        environment = {**os.environ, "KERAS_BACKEND": "tensorflow", _PARENT_VARIABLE: str(os.getpid())}
        _run_child(command, environment, stage)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return plan.path


# How the export child marks a stage line in its output (the rest is kept for error messages).
_STAGE_MARKER = "keras-gemma2 export stage: "


def _run_child(command, environment, stage):
    """Run the export child; its stage lines go to `stage` as they come.

    Its other output (TensorFlow's logs, a traceback) is kept: the last line
    of it leads the RuntimeError when the child fails.
    """
    tail = collections.deque(maxlen=80)
    process = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, errors="replace")
    try:
        for line in process.stdout:
            if line.startswith(_STAGE_MARKER):
                stage(line[len(_STAGE_MARKER):].strip())
            elif line.strip():
                tail.append(line.rstrip())
        status = process.wait()
    finally:
        if process.poll() is None:  # interrupted here (e.g. Ctrl-C in a notebook): stop it too
            process.kill()
            process.wait()
        process.stdout.close()
    if status != 0:
        last = tail[-1] if tail else f"exit status {status}"
        raise RuntimeError(
            f"The TensorFlow export process failed: {last}\n" + "\n".join(tail)[-4000:]
        )


def _die_with_parent():
    """Called first in the export child: Linux ends it when the exporting process dies.

    A killed export then leaves no orphan still converting in the background; its
    staging folder is removed by the next export (files.staging_directory).
    """
    parent = os.environ.pop(_PARENT_VARIABLE, None)
    if parent is None:  # run by hand, not by _export_in_child
        return
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return  # not Linux: the child finishes on its own
    if os.getppid() != int(parent):  # the parent died before prctl took effect
        sys.exit(1)


_PARENT_VARIABLE = "KERAS_GEMMA2_EXPORT_PARENT"


def export_preset(preset, path, format="litert", quantization=None, cache_length=None,
                  prefill_lengths=None, stop_ids=None, log=None, stage=None):
    """Load `preset` in float32 and export it (this process must run the TensorFlow backend).

    `stage(name)`, if given, is called as each stage begins, loading included.
    """
    from keras_gemma2.causal_lm import Gemma2CausalLM

    if keras.backend.backend() != "tensorflow":
        raise RuntimeError("export_preset traces with TensorFlow: set KERAS_BACKEND=tensorflow.")
    start = time.time()
    if stage:
        stage("loading the weights in a TensorFlow process")
    model = Gemma2CausalLM.from_preset(preset, dtype="float32")
    plan = plan_export(model, path, format, quantization, cache_length, prefill_lengths)
    if log:
        log(f"loaded {preset} in {time.time() - start:.1f} s")
    stop_ids = list(stop_ids) if stop_ids else _stop_ids(model)
    return _export_here(model.backbone, model.tokenizer, plan, stop_ids, stage=stage)


def main(argv=None):
    import argparse

    _die_with_parent()

    parser = argparse.ArgumentParser(description="Export a Gemma 2 preset (TensorFlow backend).")
    parser.add_argument("preset")
    parser.add_argument("path")
    parser.add_argument("--format", default="litert")
    parser.add_argument("--quantization", default=None)
    parser.add_argument("--cache-length", type=int, default=None, help=f"default: {CACHE_LENGTH_TEXT}")
    parser.add_argument("--prefill-lengths", type=int, nargs="+", default=None,
                        help=f"default: {PREFILL_LENGTHS_TEXT}")
    parser.add_argument("--stop-ids", type=int, nargs="*", default=None)
    parser.add_argument("--progress", action="store_true", help="print a line as each stage begins")
    args = parser.parse_args(argv)

    def stage(name):
        print(_STAGE_MARKER + name, file=sys.stderr, flush=True)

    export_preset(
        args.preset, args.path, args.format, args.quantization, args.cache_length,
        args.prefill_lengths, args.stop_ids, log=lambda m: print(m, file=sys.stderr),
        stage=stage if args.progress else None,
    )


if __name__ == "__main__":
    main()
