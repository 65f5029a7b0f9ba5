"""Edge export: LiteRT-LM (.litertlm), LiteRT (.tflite) and SavedModel, one signature contract.

The contract is the one Google's LiteRT-LM engine runs (Android, iOS,
desktop), so the same graph serves the phone runtime, the plain LiteRT
interpreter and export/runner.py:

* `prefill_{T}` for each bucket T: `tokens` int32 [1, T], `input_pos` int32
  [T] (the positions of a chunk; unused rows get token 0 at position 0) and
  the caches -> the caches. A long prompt is several calls, each reading what
  the cache holds and writing at its positions;
* `decode`: `tokens` int32 [1, 1], `input_pos` int32 [1] and the caches ->
  `logits` float32 [1, 1, vocab] and the caches.

Layer l's caches are `kv_cache_k_l` and `kv_cache_v_l`, float32 [1,
kv_heads, cache_length, head_dim] (position p at index p), each an input and
an output under the same name (the engine binds one buffer for both). The
sliding window is applied by masks built inside the graph from the
positions, exact on every sliding layer. Both signatures trace the model's
one cached forward (`Gemma2Backbone.forward_pass`), as `generate` does.
Shapes are static and the ops are TFLite builtins only (no Flex delegate).

A .litertlm bundles the .tflite with the tokenizer and LLM metadata
(edge/litertlm_bundle.py). The graph is traced on Keras' TensorFlow backend:
a model loaded under JAX or PyTorch is saved to a temporary preset and
exported by a child process with KERAS_BACKEND=tensorflow.
"""

import collections
import os
import shutil
import subprocess
import sys
import time

import keras

from keras_gemma2 import cli_startup
from keras_gemma2.causal_lm import Gemma2CausalLM
from keras_gemma2.edge import litert_weights
from keras_gemma2.edge.litert_conversion import CHILD_ENVIRONMENT, PARENT_VARIABLE, convert_file, die_with_parent
from keras_gemma2.edge.litertlm_bundle import write_bundle
from keras_gemma2.edge.plan import DEFAULT_FORMAT, DEFAULT_QUANTIZATION, METADATA_NAME, plan_export
from keras_gemma2.edge.signatures import build_signatures, metadata
from keras_gemma2.io.atomic import remove_staging, staging_directory
from keras_gemma2.io.safetensors_files import write_json
from keras_gemma2.model.quantization import quantization_modes

# Hidden folders beside the output while an export runs (files.staging_directory).
STAGING_PREFIX = ".keras_gemma2-export-"


def export(
    model,
    path,
    format=DEFAULT_FORMAT,
    quantization=DEFAULT_QUANTIZATION,
    cache_length=None,
    prefill_lengths=None,
    progress=None,
    embedding_quantization=None,
):
    """Export `model` (a Gemma2CausalLM) for on-device generation; returns the artifact path.

    `format`: None (the default) reads it from the suffix: ".litertlm" is a
    LiteRT-LM bundle (model, tokenizer and metadata in one file, what the
    phone runtime loads); ".tflite" is "litert" (the tokenizer and a metadata
    file are written beside it as `<stem>.tokenizer.model` / `<stem>.json`);
    "saved_model" must be asked for (path is a new directory; tokenizer and
    metadata inside).
    `quantization`: None (float32), "int8" or "int4". LiteRT: int8 or int4
    weights, symmetric with one scale per output channel (int4: two codes a
    byte), float32 activations (the runtime's hybrid kernels); the token
    lookup and the tied output projection share one table quantized the same
    way, one scale per row (`litert_weights`). SavedModel: the weights of a
    Keras-quantized copy of the model (`Gemma2CausalLM.quantize`), dequantized
    inside the graph.
    `cache_length`: positions the KV cache holds (prompt + generated tokens);
    None: min(1024, the model's context length).
    `prefill_lengths`: the static prompt buckets, each <= cache_length; None:
    those of (32, 128, 512) that fit the cache, or the cache length if none does
    (see `export_lengths`).
    `progress`: None (silent) or a callable `progress(stage, step, steps)`,
    called as step `step` of `steps` begins (an export of the 2B takes minutes).
    `embedding_quantization`: LiteRT only; None (the token table as
    `quantization`) or "int8" / "int4", e.g. int4 blocks with an int8 table.
    """
    plan = plan_export(model, path, format, quantization, cache_length, prefill_lengths, embedding_quantization)
    if keras.backend.backend() == "tensorflow" and model.backbone.compute_dtype == "float32":
        return _export_here(
            model.backbone, model.tokenizer, plan, model.default_stop_token_ids(), progress=progress
        )
    return _export_in_child(model, plan, progress)


def _export_here(backbone, tokenizer, plan, stop_ids, stitch=True, progress=None, stage=None):
    """Trace, save and (for LiteRT) convert in this TensorFlow-backend process.

    An int8 or int4 LiteRT export converts a two-block int8 template and
    writes every block's own weights into it (`litert_weights`): the
    converter's memory then does not grow with depth. `stitch=False` converts
    the whole int8 model directly (the reference the tests compare against;
    int4 always stitches: no converter writes it).
    `progress(stage, step, steps)` (see export) hears of each stage; or
    `stage(name)`, a callable that does the numbering (export_preset's).
    """
    import tensorflow as tf

    parent = os.path.dirname(plan.path)
    stitched = _stitches(plan, stitch)
    if stage is None:
        stage = _Steps(progress, _stage_count(plan, backbone, stitch))
    if _quantizes_a_copy(plan, backbone):
        stage(f"quantizing a copy of the model to {plan.quantization} in Keras")
        backbone = _quantized_copy(backbone, plan.quantization)
    staging = staging_directory(parent, STAGING_PREFIX)
    try:
        module, concrete, slots = build_signatures(
            backbone, plan.cache_length, plan.prefill_lengths,
            int8_lookup=plan.format != "saved_model" and plan.quantization is not None,
            template=stitched, fuse_projections=plan.format != "saved_model", stage=stage,
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

        stem = os.path.splitext(os.path.basename(plan.path))[0]
        files = {
            "model": f"{stem}.tflite",
            "tokenizer": f"{stem}.tokenizer.model" if tokenizer is not None else None,
        }
        staged_model = os.path.join(staging, files["model"])
        if stitched:
            template = os.path.join(staging, "template.tflite")
            convert_file(saved_model, template, signature_keys, "int8", buffer_offsets=True)
            shutil.rmtree(saved_model)
            stage(f"writing each of the {backbone.config.num_layers} blocks' {plan.quantization} weights")
            litert_weights.stitch(
                template, staged_model, backbone, bits=_BITS[plan.quantization],
                embedding_bits=_BITS[plan.embedding_quantization],
            )
            os.remove(template)
        else:
            convert_file(saved_model, staged_model, signature_keys, plan.quantization)
        if plan.format == "litertlm":
            stage("writing the .litertlm bundle (model, tokenizer, metadata)")
            staged_bundle = os.path.join(staging, os.path.basename(plan.path))
            files = {"bundle": os.path.basename(plan.path)}
            write_bundle(
                staged_model, tokenizer.save_assets(staging),
                metadata(backbone, tokenizer, plan, stop_ids, slots, files), staged_bundle,
            )
            os.replace(staged_bundle, plan.path)
            return plan.path
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
        remove_staging(staging)


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
    if plan.format != "saved_model":
        count += 1 + int(_stitches(plan, stitch))
    return count


_BITS = {"int8": 8, "int4": 4}


def _stitches(plan, stitch=True):
    """Whether a LiteRT export converts an int8 template and writes each block's weights into it."""
    if plan.format == "saved_model":
        return False
    return plan.quantization == "int4" or (stitch and plan.quantization == "int8")


def _quantizes_a_copy(plan, backbone):
    return bool(plan.format == "saved_model" and plan.quantization and not quantization_modes(backbone))


def _quantized_copy(backbone, mode):
    """A Keras-quantized copy (the caller's model stays float)."""
    copy = backbone.clone()
    Gemma2CausalLM(copy).quantize(mode)
    return copy


# ---- other backends: a TensorFlow child process ------------------------------
def _export_in_child(model, plan, progress=None):
    """Save the weights to a temporary preset; a KERAS_BACKEND=tensorflow child exports it.

    The child is `keras-gemma2 export ... --tensorflow-child` (run_export_child);
    it reports its stages on its output, and they reach `progress` numbered on
    after this process's own.
    """
    stage = _Steps(progress, 2 + _stage_count(plan, model.backbone))  # + saving, + the child loading
    parent = os.path.dirname(plan.path)
    scratch = staging_directory(parent, STAGING_PREFIX)  # a full float copy of the weights
    try:
        stage("saving a float32 copy of the weights for a TensorFlow process")
        preset = os.path.join(scratch, "preset")
        model.save_to_preset(preset)
        command = [
            sys.executable, "-m", "keras_gemma2.cli", "export", "--preset", preset, plan.path,
            "--format", plan.format,
            "--cache-length", str(plan.cache_length),
            "--prefill-lengths", *[str(p) for p in plan.prefill_lengths],
            CHILD_OPTION, STOP_IDS_OPTION, *[str(i) for i in model.default_stop_token_ids()],
        ]
        if plan.quantization:
            command += ["--quantization", plan.quantization]
        if plan.embedding_quantization not in (None, plan.quantization):
            command += [EMBEDDING_OPTION, plan.embedding_quantization]
        environment = {**os.environ, **CHILD_ENVIRONMENT, PARENT_VARIABLE: str(os.getpid())}
        _run_child(command, environment, stage)
    finally:
        remove_staging(scratch)
    return plan.path


# How the export child marks a stage line in its output (the rest is kept for error messages).
_STAGE_MARKER = "keras-gemma2 export stage: "
# The CLI's hidden `export` options that make it the child: this flag, and the stop ids to write.
CHILD_OPTION = "--tensorflow-child"
STOP_IDS_OPTION = "--stop-ids"
# export()'s `embedding_quantization` on the command line.
EMBEDDING_OPTION = "--embedding-quantization"


def _run_child(command, environment, stage):
    """Run the export child; its stage lines go to `stage` as they come.

    Its other output (TensorFlow's logs, a traceback) is kept: the last line
    of it leads the RuntimeError when the child fails.
    """
    tail = collections.deque(maxlen=80)
    process = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, errors="replace")

    def stop_child():  # this command is interrupted or terminated: the child removes its staging, then ends
        process.terminate()
        try:
            process.wait(timeout=_CHILD_STOP_S)
        except subprocess.TimeoutExpired:
            process.kill()

    with cli_startup.on_abrupt_exit(stop_child):
        _follow_child(process, tail, stage)
    status = process.returncode
    if status != 0:
        last = tail[-1].removeprefix("error: ") if tail else f"exit status {status}"  # the CLI's one line
        raise RuntimeError(
            f"The TensorFlow export process failed: {last}\n" + "\n".join(tail)[-4000:]
        )


# How long an interrupted export waits for its child to remove its own staging folder.
_CHILD_STOP_S = 10


def _follow_child(process, tail, stage):
    """Read the child's output to its end: stage lines to `stage`, the rest into `tail`."""
    try:
        for line in process.stdout:
            if line.startswith(_STAGE_MARKER):
                stage(line[len(_STAGE_MARKER):].strip())
            elif line.strip():
                tail.append(line.rstrip())
        process.wait()
    finally:
        if process.poll() is None:  # interrupted here (e.g. Ctrl-C in a notebook): stop it too
            process.kill()
            process.wait()
        process.stdout.close()


def export_preset(preset, path, format=DEFAULT_FORMAT, quantization=DEFAULT_QUANTIZATION, cache_length=None,
                  prefill_lengths=None, stop_ids=None, log=None, stage=None, embedding_quantization=None):
    """Load `preset` in float32 and export it (this process must run the TensorFlow backend).

    `stage(name)`, if given, is called as each stage begins, loading included.
    """
    if keras.backend.backend() != "tensorflow":
        raise RuntimeError("export_preset traces with TensorFlow: set KERAS_BACKEND=tensorflow.")
    start = time.time()
    if stage:
        stage("loading the weights in a TensorFlow process")
    model = Gemma2CausalLM.from_preset(preset, dtype="float32")
    plan = plan_export(model, path, format, quantization, cache_length, prefill_lengths, embedding_quantization)
    if log:
        log(f"loaded {preset} in {time.time() - start:.1f} s")
    stop_ids = list(stop_ids) if stop_ids else model.default_stop_token_ids()
    return _export_here(model.backbone, model.tokenizer, plan, stop_ids, stage=stage)


def run_export_child(preset, path, format, quantization, cache_length, prefill_lengths, stop_ids,
                     embedding_quantization=None):
    """The TensorFlow child's export (`keras-gemma2 export --tensorflow-child`, from _export_in_child).

    It ends with its parent and reports each stage as a marked line on stderr.
    """
    die_with_parent()

    def stage(name):
        print(_STAGE_MARKER + name, file=sys.stderr, flush=True)

    return export_preset(
        preset, path, format, quantization, cache_length, prefill_lengths, stop_ids,
        log=lambda message: print(message, file=sys.stderr), stage=stage,
        embedding_quantization=embedding_quantization,
    )
