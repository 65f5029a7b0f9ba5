"""Edge export: LiteRT / SavedModel signatures driven by the on-device runner (export/runner.py)."""

import os
import re
import sys

import keras
import numpy as np
import pytest

import keras_gemma2
from helpers import TINY, randomize_weights

# Tests marked backend_agnostic run once, under conftest.AGNOSTIC_BACKEND (jax): export's argument checks run before
# any tracing.

ON_TF = keras.backend.backend() == "tensorflow"
needs_tf = pytest.mark.skipif(not ON_TF, reason="in-process export traces with TensorFlow; other backends go through a child process (tested once)")
# Prompts shorter than, equal to and longer than the window (4): the window is exercised in prefill and decode.
PROMPTS = ([2, 5, 9], [2, 5, 9, 17, 33, 40, 41], list(range(2, 15)))
CACHE = 24
BUCKETS = (4, 8, 16)


def _reference(model, prompt):
    tokens = model.generate(np.array([prompt]), max_new_tokens=CACHE - len(prompt), stop_token_ids=[])
    return [int(t) for t in np.asarray(tokens[0])]


@pytest.fixture(scope="module", params=["litert", "saved_model"])
def float_export(request, tiny_model, tmp_path_factory):
    """The tiny model's float export (cache CACHE, buckets BUCKETS) as .tflite and as SavedModel."""
    format = request.param
    path = tmp_path_factory.mktemp(format) / ("m.tflite" if format == "litert" else "saved")
    keras_gemma2.export(tiny_model, path, format=format, cache_length=CACHE, prefill_lengths=BUCKETS)
    return str(path)


@needs_tf
def test_float_export_generates_the_same_tokens(tiny_model, float_export, Runner):
    runner = Runner.load(float_export)
    # LiteRT-LM's contract: every layer (sliding ones too) holds the whole cache, one named input per k / v.
    assert runner.metadata["cache_slots"] == [CACHE] * TINY.num_layers
    assert runner.metadata["cache_names"] == [
        [f"kv_cache_k_{i}", f"kv_cache_v_{i}"] for i in range(TINY.num_layers)
    ]
    assert runner.metadata["cache_shape"] == [1, TINY.num_key_value_heads, CACHE, TINY.head_dim]
    assert runner.metadata["signatures"] == {
        "prefill": {str(p): f"prefill_{p}" for p in BUCKETS}, "decode": "decode",
    }
    for prompt in PROMPTS:
        # Up to the last cache slot: decoding runs past the window many times over.
        assert runner.generate(prompt, max_new_tokens=CACHE - len(prompt)) == _reference(tiny_model, prompt)


@needs_tf
@pytest.mark.parametrize("length, chunks", [
    (20, [16, 4]),  # 19 prefilled: a full bucket, then a padded one starting at position 16
    (22, [16, 4, 4]),  # 21: three calls, each reading what the previous ones wrote
    (CACHE - 1, [16, 4, 4]),  # the longest prompt the cache holds
    (1, []),  # BOS alone: nothing to prefill, decode gives the first logits
])
def test_a_prompt_longer_than_every_bucket_is_prefilled_in_chunks(tiny_model, float_export, length, chunks,
                                                                  Runner):
    """Longer than the largest bucket (16) and the window (4): no prompt limit below the cache."""
    runner = Runner.load(float_export)
    runner.stop_ids = set()  # random weights: compared with generate(stop_token_ids=[])
    prompt = [2] + [int(t) for t in np.random.default_rng(length).integers(3, TINY.vocabulary_size, length - 1)]
    assert runner.generate(prompt, max_new_tokens=CACHE - length) == _reference(tiny_model, prompt)
    assert runner.stats["chunks"] == chunks and runner.stats["prompt_tokens"] == length


@needs_tf
def test_a_prompt_that_does_not_fit_the_cache_is_refused(float_export, Runner):
    runner = Runner.load(float_export)
    for prompt in ([2] * CACHE, [2] * (CACHE + 30)):
        with pytest.raises(ValueError, match=f"Prompt of {len(prompt)} tokens does not fit the {CACHE}-position cache"):
            runner.generate(prompt, max_new_tokens=1)
    with pytest.raises(ValueError, match="Empty prompt"):
        runner.generate([], max_new_tokens=1)


@needs_tf
def test_litert_file_uses_builtin_ops_only(tiny_model, tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    path = tmp_path / "m.tflite"
    keras_gemma2.export(tiny_model, path, quantization="int8", cache_length=CACHE, prefill_lengths=(8,))
    interpreter = Interpreter(model_path=str(path))
    ops = {op["op_name"] for op in interpreter._get_ops_details()}
    assert not {op for op in ops if op.startswith("Flex") or op in ("CUSTOM", "VAR_HANDLE", "READ_VARIABLE")}
    assert set(interpreter.get_signature_list()) == {"prefill_8", "decode"}


def _int4_codes(data, shape):
    """TFLite INT4 bytes -> int8 codes: element 2i in the low nibble of byte i, 2i + 1 in the high one."""
    nibbles = np.stack([data & 0x0F, data >> 4], axis=-1).reshape(-1).astype(np.int8)
    codes = np.where(nibbles > 7, nibbles - 16, nibbles).astype(np.int8)
    return codes[: int(np.prod(shape))].reshape(shape)


def _fc_weights(path):
    """{tensor name: (int8 codes, scales, buffer)} of every fully-connected op in a .tflite
    (INT4 weights unpacked); "lookup": (None, None, buffer, type) of the token lookup's table."""
    from tensorflow.lite.python import schema_py_generated as schema

    raw = np.fromfile(path, np.uint8)
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(raw, 0))
    codes = [max(c.builtinCode, c.deprecatedBuiltinCode) for c in model.operatorCodes]
    found = {}
    for subgraph in model.subgraphs:
        for op in subgraph.operators:
            if codes[op.opcodeIndex] == schema.BuiltinOperator.FULLY_CONNECTED:
                tensor = subgraph.tensors[op.inputs[1]]
                buffer = model.buffers[tensor.buffer]
                data = np.asarray(
                    raw[buffer.offset : buffer.offset + buffer.size] if buffer.offset > 1 else buffer.data, np.uint8
                )
                shape = tuple(int(d) for d in tensor.shape)
                found[tensor.name.decode()] = (
                    _int4_codes(data, shape) if tensor.type == schema.TensorType.INT4
                    else data.view(np.int8).reshape(shape),
                    np.asarray(tensor.quantization.scale, np.float32),
                    tensor.buffer,
                )
            if codes[op.opcodeIndex] == schema.BuiltinOperator.GATHER:
                tensor = subgraph.tensors[op.inputs[0]]
                if tensor.type in (schema.TensorType.INT8, schema.TensorType.INT4):
                    found["lookup"] = (None, None, tensor.buffer, tensor.type)
    return found


@needs_tf
@pytest.mark.parametrize("weights", ["random", "initial"])
def test_int8_export_writes_every_block_its_own_weights(tiny_model, tmp_path, weights, Runner):
    """The int8 file is a converted two-block template with each block's weights written in."""
    from keras_gemma2.edge import litert_weights
    from keras_gemma2.edge.export import _export_here
    from keras_gemma2.edge.plan import plan_export

    if weights == "initial":  # Keras' initializers: every norm scale 0 (a multiply by 1)
        keras.utils.set_random_seed(1)
        tiny_model = keras_gemma2.Gemma2CausalLM(keras_gemma2.Gemma2Backbone(TINY))

    paths = {}
    for stitch in (True, False):
        paths[stitch] = str(tmp_path / f"stitch_{stitch}.tflite")
        plan = plan_export(tiny_model, paths[stitch], "litert", "int8", CACHE, (8,))
        _export_here(tiny_model.backbone, None, plan, [1], stitch=stitch)
    weights = _fc_weights(paths[True])
    reference = litert_weights.BlockWeights(tiny_model.backbone)
    for block in range(TINY.num_layers):  # block 2 reads block 0's weights in the template
        for name in litert_weights.PROJECTIONS:
            q, scale, _ = weights[f"decoder_block_{block}/{name}"]
            expected_q, expected_scale = litert_weights.quantize_channels(reference.projection(block, name))
            np.testing.assert_array_equal(q, expected_q)
            np.testing.assert_allclose(scale, expected_scale, rtol=1e-6)
    # One copy of the embedding: the tied projection reads the token-lookup table.
    assert weights["token_embedding/int8_table"][2] == weights["lookup"][2]
    # Same greedy steps as converting the whole model directly.
    ids = [2] + list(range(5, 25))
    direct = Runner.load(paths[False]).teacher_forced_argmax(ids)
    np.testing.assert_array_equal(Runner.load(paths[True]).teacher_forced_argmax(ids), direct)


@needs_tf
@pytest.mark.parametrize("embedding", ["int4", "int8"])
def test_int4_export_writes_every_block_its_own_int4_weights(tiny_model, tmp_path, embedding, Runner):
    """int4 takes int8's path (an int8 template, each block's weights written in) with 4-bit codes:
    INT4 tensors, one scale per output channel; the token table int4 too unless asked for int8."""
    from tensorflow.lite.python import schema_py_generated as schema

    from keras_gemma2.edge import litert_weights

    # The rule: symmetric, scale = max|w| / 7, halves rounded away from zero.
    q, scale = litert_weights.quantize_channels(np.array([[7.0, 3.5, -2.5, 0.49, -7.0]]), bits=4)
    assert q.tolist() == [[7, 4, -3, 0, -7]] and scale.tolist() == [1.0]
    path = tmp_path / "m.tflite"
    keras_gemma2.export(tiny_model, path, quantization="int4", cache_length=CACHE, prefill_lengths=(8,),
                        embedding_quantization=None if embedding == "int4" else embedding)
    weights = _fc_weights(str(path))
    reference = litert_weights.BlockWeights(tiny_model.backbone)
    for block in range(TINY.num_layers):  # block 2 reads block 0's weights in the template
        for name in litert_weights.PROJECTIONS:
            q, scale, _ = weights[f"decoder_block_{block}/{name}"]
            expected_q, expected_scale = litert_weights.quantize_channels(reference.projection(block, name), bits=4)
            assert np.abs(expected_q).max() == 7
            np.testing.assert_array_equal(q, expected_q)
            np.testing.assert_allclose(scale, expected_scale, rtol=1e-6)
    # One table, lookup and tied projection: its codes and row scales are litert_weights' own.
    bits = int(embedding[3:])
    q, scale, table = weights[f"token_embedding/{embedding}_table"]
    assert weights["lookup"][2:] == (table, getattr(schema.TensorType, embedding.upper()))
    expected_q, expected_scale = litert_weights.quantize_rows(tiny_model.backbone.token_embedding.embeddings,
                                                              bits=bits)
    np.testing.assert_array_equal(q, expected_q)
    np.testing.assert_allclose(scale, expected_scale, rtol=1e-6)
    # It runs (the agreement with the float model is measured on the demo teacher below).
    runner = Runner.load(str(path))
    runner.stop_ids = set()
    assert runner.metadata["quantization"] == "int4"
    assert len(runner.generate(PROMPTS[1], max_new_tokens=8)) == 8


@needs_tf
@pytest.mark.parametrize("broken, message", [
    ("projection", "matches no block weight"),  # e.g. a converter that stopped folding the norm scale
    ("codes", "does not read the int8 token table"),  # the tied projection reads another table
])
def test_int8_export_stops_when_its_quantization_disagrees_with_the_converter(
    tiny_model, tmp_path, monkeypatch, broken, message
):
    from keras_gemma2.edge import litert_weights, signatures

    if broken == "projection":
        original = litert_weights.BlockWeights.projection
        monkeypatch.setattr(litert_weights.BlockWeights, "projection",
                            lambda self, b, n: original(self, b, n) * 1.5)
    else:
        original = signatures._codes_at_run_time
        monkeypatch.setattr(signatures, "_codes_at_run_time",
                            lambda table, input_pos: original(keras.ops.flip(table, 0), input_pos))
    with pytest.raises(RuntimeError, match=message):
        keras_gemma2.export(tiny_model, tmp_path / "m.tflite", quantization="int8", cache_length=CACHE,
                            prefill_lengths=(8,))
    assert not (tmp_path / "m.tflite").exists()


@pytest.fixture(scope="module")
def demo_teacher():
    # A trained model with its own tokenizer and held-out text: quantization error is meaningful.
    return keras_gemma2.from_preset("gemma2_demo_teacher", dtype="float32")


def _held_out_ids(model):
    from keras_gemma2.checkpoints import registry

    directory = registry.get("gemma2_demo_teacher")["local"]
    with open(os.path.join(directory, "held_out.txt"), encoding="utf-8") as f:
        return model.tokenizer.tokenize(f.read()[:3000])[:200]


@needs_tf
def test_int8_litert_agrees_on_top1_and_is_a_quarter_of_float(demo_teacher, tmp_path, Runner):
    ids = _held_out_ids(demo_teacher)
    expected = np.asarray(demo_teacher({"token_ids": np.array([ids])}))[0].argmax(-1)[:-1]
    sizes = {}
    for quantization in (None, "int8"):
        path = tmp_path / f"{quantization}.tflite"
        keras_gemma2.export(demo_teacher, path, quantization=quantization, cache_length=256, prefill_lengths=(16,))
        sizes[quantization] = os.path.getsize(path)
        if quantization == "int8":  # vocabulary 2048: the lookup's row scales stay float32
            from ai_edge_litert.interpreter import Interpreter

            ops = {op["op_name"] for op in Interpreter(model_path=str(path))._get_ops_details()}
            assert "DEQUANTIZE" not in ops
        predicted = Runner.load(str(path)).teacher_forced_argmax(ids, prompt_length=1)
        agreement = (predicted == expected).mean()
        assert agreement >= (1.0 if quantization is None else 0.95), (quantization, agreement)
    # One int8 copy of the embedding (lookup and projection share it): measured 0.26.
    assert sizes["int8"] <= 0.28 * sizes[None], sizes
    # Text in, text out, as an app: the runner tokenizes with the exported tokenizer file.
    runner = Runner.load(str(tmp_path / "None.tflite"))
    assert runner.generate("def ", max_new_tokens=12) == demo_teacher.generate("def ", max_new_tokens=12)
    assert "".join(runner.stream("def ", max_new_tokens=12)) == runner.generate("def ", max_new_tokens=12)


@needs_tf
def test_int4_litert_agrees_on_top1_and_is_smaller_than_int8(demo_teacher, tmp_path, Runner):
    """The demo teacher's held-out text (199 teacher-forced steps): int4 blocks with an int4 table,
    and with an int8 table, against the float model; each file smaller than the int8 one."""
    ids = _held_out_ids(demo_teacher)
    expected = np.asarray(demo_teacher({"token_ids": np.array([ids])}))[0].argmax(-1)[:-1]
    sizes, agreement = {}, {}
    for quantization, embedding in (("int8", None), ("int4", None), ("int4", "int8")):
        path = tmp_path / f"{quantization}_{embedding}.tflite"
        keras_gemma2.export(demo_teacher, path, quantization=quantization, cache_length=256, prefill_lengths=(16,),
                            embedding_quantization=embedding)
        sizes[quantization, embedding] = os.path.getsize(path)
        predicted = Runner.load(str(path)).teacher_forced_argmax(ids, prompt_length=1)
        agreement[quantization, embedding] = (predicted == expected).mean()
    # Measured: int8 0.985; int4 0.829; int4 with the int8 table 0.894 (channel-wise int4 on a
    # 2048-token, 192-wide model; ai-edge-quantizer's int4 measured 0.84 here).
    assert agreement["int4", None] >= 0.75, agreement
    assert agreement["int4", "int8"] >= 0.85, agreement
    # Measured 2,593,472 / 1,708,736 / 1,512,128 bytes.
    assert sizes["int4", None] < sizes["int4", "int8"] < 0.7 * sizes["int8", None], sizes


@needs_tf
def test_int8_saved_model_holds_keras_quantized_weights(demo_teacher, tmp_path, Runner):
    from keras_gemma2.edge.litert_conversion import _directory_bytes

    ids = _held_out_ids(demo_teacher)[:100]
    quantized = keras_gemma2.from_preset("gemma2_demo_teacher", dtype="float32")
    quantized.quantize("int8")
    expected = np.asarray(quantized({"token_ids": np.array([ids])}))[0].argmax(-1)[:-1]
    float_expected = np.asarray(demo_teacher({"token_ids": np.array([ids])}))[0].argmax(-1)[:-1]
    sizes = {}
    for quantization in (None, "int8"):
        path = tmp_path / f"saved_{quantization}"
        keras_gemma2.export(demo_teacher, path, format="saved_model", quantization=quantization,
                            cache_length=128, prefill_lengths=(16,))
        sizes[quantization] = _directory_bytes(path / "variables")
    assert demo_teacher.backbone.token_embedding.quantization_mode is None  # the caller's model stays float
    runner = Runner.load(str(tmp_path / "saved_int8"))
    assert runner.metadata["quantization"] == "int8"
    predicted = runner.teacher_forced_argmax(ids, prompt_length=1)
    assert (predicted == expected).mean() >= 0.98  # the same int8 math as the Keras model
    assert (predicted == float_expected).mean() >= 0.95
    assert sizes["int8"] <= 0.32 * sizes[None], sizes


@needs_tf
def test_keras_quantized_model_exports_to_saved_model_but_not_litert(tmp_path, Runner):
    keras.utils.set_random_seed(0)
    model = randomize_weights(keras_gemma2.Gemma2CausalLM(keras_gemma2.Gemma2Backbone(TINY)))
    model.quantize("int8")
    for name in ("m.tflite", "m.litertlm"):
        with pytest.raises(ValueError, match="export the float model"):
            keras_gemma2.export(model, tmp_path / name, cache_length=CACHE, prefill_lengths=(8,))
    with pytest.raises(ValueError, match="already quantized"):
        keras_gemma2.export(model, tmp_path / "s", format="saved_model", quantization="int4",
                            cache_length=CACHE, prefill_lengths=(8,))
    keras_gemma2.export(model, tmp_path / "s", format="saved_model", cache_length=CACHE, prefill_lengths=(8,))
    prompt = PROMPTS[1]
    expected = model.generate(np.array([prompt]), max_new_tokens=6, stop_token_ids=[])
    assert Runner.load(str(tmp_path / "s")).generate(prompt, max_new_tokens=6) == [
        int(t) for t in np.asarray(expected[0])
    ]


@pytest.mark.skipif(ON_TF, reason="the child-process path is for non-TensorFlow backends")
def test_export_from_another_backend_runs_a_tensorflow_child(tiny_model, tmp_path, Runner):
    path = tmp_path / "m.tflite"
    keras_gemma2.export(tiny_model, path, cache_length=CACHE, prefill_lengths=(16,))
    prompt = PROMPTS[2]
    assert Runner.load(str(path)).generate(prompt, max_new_tokens=8) == _reference(tiny_model, prompt)[:8]


@pytest.mark.skipif(ON_TF, reason="the child-process path is for non-TensorFlow backends")
def test_the_tensorflow_child_gets_the_embedding_quantization(tiny_model, tmp_path):
    from tensorflow.lite.python import schema_py_generated as schema

    path = tmp_path / "m.tflite"
    keras_gemma2.export(tiny_model, path, quantization="int4", embedding_quantization="int8",
                        cache_length=CACHE, prefill_lengths=(16,))
    weights = _fc_weights(path)
    assert weights["lookup"][3] == schema.TensorType.INT8  # the table int8, the blocks int4
    assert weights["decoder_block_0/down"][0].max() <= 7


@pytest.mark.backend_agnostic
def test_an_empty_path_is_named_as_empty(tiny_model):
    """It was read as the current folder, "with no suffix"."""
    with pytest.raises(ValueError, match="The export path is empty"):
        keras_gemma2.export(tiny_model, "")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"format": "onnx"}, "Unknown export format"),
        ({"quantization": "int2"}, "Unknown quantization"),
        ({"path": "model.bin"}, "Unknown export suffix '.bin'"),
        ({"path": "model"}, "Unknown export suffix '(none)'"),
        ({"format": "litert", "path": "model.litertlm"}, "litert export is a .tflite file"),
        ({"format": "saved_model", "path": "model.tflite"}, "SavedModel is a directory"),
        ({"format": "saved_model", "path": "model.litertlm"}, "SavedModel is a directory"),
        ({"cache_length": 65}, "outside [1, 64]"),
        ({"path": "m.litertlm", "cache_length": 65}, "outside [1, 64]"),
        ({"prefill_lengths": (8, 32)}, "exceed cache_length"),
        ({"path": "m.litertlm", "prefill_lengths": (8, 32)}, "exceed cache_length"),
        ({"path": "m.litertlm"}, "carries the tokenizer"),  # the tiny model has none
        ({"prefill_lengths": (0,)}, "positive integers"),
        ({"embedding_quantization": "int8"}, "embedding_quantization='int8'"),  # a float export
        ({"quantization": "int4", "embedding_quantization": "int2"}, "use None, 'int8' or 'int4'"),
        ({"format": "saved_model", "quantization": "int4", "embedding_quantization": "int8"}, ".tflite export"),
    ],
)
@pytest.mark.backend_agnostic
def test_bad_arguments_fail_before_any_work(tiny_model, tmp_path, kwargs, message):
    kwargs = {"path": "m.tflite", "cache_length": 16, **kwargs}
    if kwargs.get("format") == "saved_model" and kwargs["path"] == "m.tflite":
        kwargs["path"] = "saved"
    kwargs["path"] = tmp_path / kwargs["path"]
    with pytest.raises(ValueError, match=re.escape(message)):
        keras_gemma2.export(tiny_model, **kwargs)
    assert os.listdir(tmp_path) == []  # nothing written


def test_unwritable_path_and_unmerged_lora_are_refused(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras_gemma2.Gemma2CausalLM(keras_gemma2.Gemma2Backbone(TINY))
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(PermissionError, match="Choose a writable directory"):
        keras_gemma2.export(model, blocker / "m.tflite", cache_length=16, prefill_lengths=(8,))
    model.enable_lora(2)
    for name in ("m.tflite", "m.litertlm"):
        with pytest.raises(ValueError, match="merge_lora"):
            keras_gemma2.export(model, tmp_path / name, cache_length=16, prefill_lengths=(8,))
    assert os.listdir(tmp_path) == ["file"]


def test_cli_export_and_its_errors(tmp_path, capsys, Runner):
    from keras_gemma2 import cli

    path = tmp_path / "demo.tflite"
    assert cli.main(["export", "--preset", "gemma2_demo", str(path), "--quantization", "int8",
                     "--cache-length", "64", "--prefill-lengths", "16"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["demo.json", "demo.tflite", "demo.tokenizer.model"]
    assert Runner.load(str(path)).generate("def ", max_new_tokens=4)
    assert cli.main(["export", "--preset", "gemma2_demo", str(tmp_path / "x.tflite"), "--format", "onnx"]) == 2
    assert "Unknown export format" in capsys.readouterr().err


_EXPORT_SCRIPT = """
import sys, keras, keras_gemma2
from helpers import TINY, randomize_weights
keras.utils.set_random_seed(0)
model = randomize_weights(keras_gemma2.Gemma2CausalLM(keras_gemma2.Gemma2Backbone(TINY)))
keras_gemma2.export(model, sys.argv[1], cache_length=16, prefill_lengths=(8,))
"""


def _processes_naming(text):
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


def test_a_killed_export_leaves_no_staging_behind(tiny_model, tmp_path):
    """Killed mid-export: its hidden staging (a full float copy, ~10 GB for the 2B) is removed by
    the next export, and no orphaned child goes on converting."""
    import signal
    import subprocess
    import time

    from keras_gemma2.edge.export import STAGING_PREFIX

    killed = tmp_path / "killed.tflite"
    here = os.path.dirname(os.path.abspath(__file__))
    process = subprocess.Popen([sys.executable, "-c", _EXPORT_SCRIPT, str(killed)], cwd=here,
                               env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    deadline = time.time() + 300
    while not any(n.startswith(STAGING_PREFIX) for n in os.listdir(tmp_path)):
        assert process.poll() is None and time.time() < deadline, "the export never staged anything"
        time.sleep(0.05)
    time.sleep(1.0)  # into the export's work (the child process starts, on jax and torch)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert [n for n in os.listdir(tmp_path) if n.startswith(STAGING_PREFIX)]  # what a kill leaves
    deadline = time.time() + 30
    while _processes_naming(str(killed)):  # a child exporter dies with its parent
        assert time.time() < deadline, "the export's child process outlived it"
        time.sleep(0.2)

    keras_gemma2.export(tiny_model, tmp_path / "m.tflite", cache_length=16, prefill_lengths=(8,))
    assert sorted(os.listdir(tmp_path)) == ["m.json", "m.tflite"]
