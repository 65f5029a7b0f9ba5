"""The .litertlm bundle in Google's LiteRT-LM engine itself (litert-lm-api), against `generate`."""

import json
import os
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_gemma2
from keras_gemma2 import cli
from keras_gemma2.checkpoints import registry
from keras_gemma2.edge import litertlm_engine
from keras_gemma2.edge.litertlm_bundle import METADATA_KEY

ON_TF = keras.backend.backend() == "tensorflow"
needs_tf = pytest.mark.skipif(not ON_TF, reason="in-process export traces with TensorFlow (the engine is backend-free)")
CACHE, BUCKETS = 64, (4, 8)
SHORT = "Hello, world!"
# Longer than the tiny model's window (4) and the largest bucket (8): the engine prefills it in
# several calls past position 0, and every sliding layer masks to its window.
LONG = "The quick brown fox jumps over the lazy dog. Keras runs on JAX."


@pytest.fixture(scope="module")
def bundle(tiny_text_preset, tmp_path_factory):
    """(path, model): the tiny random model with its tokenizer as a float32 .litertlm."""
    if not ON_TF:
        pytest.skip("exported in-process under TensorFlow; other backends: test_export_from_another_backend")
    _, model = tiny_text_preset
    path = str(tmp_path_factory.mktemp("litertlm") / "tiny.litertlm")
    keras_gemma2.export(model, path, cache_length=CACHE, prefill_lengths=BUCKETS)
    return path, model


@pytest.fixture(scope="module")
def engine(bundle, tmp_path_factory):
    loaded = litertlm_engine.BundleEngine(bundle[0], threads=2, cache_dir=str(tmp_path_factory.mktemp("xnnpack")))
    yield loaded
    loaded.close()


def _generated_ids(model, ids, max_new_tokens):
    """`generate`'s greedy continuation of `ids` (stopping where it stops), as a list.

    The engine gives text, not ids, and a control id detokenizes to "": every id here must
    show in the text, so that equal text means equal ids.
    """
    out = model.generate(np.array([ids]), max_new_tokens=max_new_tokens, sampler="greedy")
    generated = [int(t) for t in np.asarray(out[0])]
    silent = [i for i in generated if model.tokenizer.detokenize([i]) == ""]
    assert not silent, f"ids {silent} detokenize to nothing: a text comparison would not see them"
    return generated


def _ids(model, text, bos):
    return [int(i) for i in np.asarray(model.tokenizer.tokenize(text, add_bos=bos))]


def test_the_bundle_holds_the_engine_contract(bundle, tmp_path):
    from ai_edge_litert.interpreter import Interpreter
    from litert_lm_builder import litertlm_builder

    path, model = bundle
    toml = litertlm_builder.unpack(path, str(tmp_path / "unpacked"))
    with open(toml) as f:
        text = f.read()
    assert 'model_type = "prefill_decode"' in text and "SP_Tokenizer" in text and "LlmMetadata" in text
    (tflite,) = [n for n in os.listdir(tmp_path / "unpacked") if n.endswith(".tflite")]
    interpreter = Interpreter(model_path=str(tmp_path / "unpacked" / tflite))
    signatures = interpreter.get_signature_list()
    assert set(signatures) == {"prefill_4", "prefill_8", "decode"}
    caches = [f"kv_cache_{kind}_{i}" for i in range(model.config.num_layers) for kind in "kv"]
    for name, signature in signatures.items():
        assert sorted(signature["inputs"]) == sorted(["tokens", "input_pos", *caches]), name
        expected = caches + (["logits"] if name == "decode" else [])
        assert sorted(signature["outputs"]) == sorted(expected), name
    decode = interpreter.get_signature_runner("decode").get_input_details()
    assert list(decode["input_pos"]["shape"]) == [1]
    assert list(decode["kv_cache_k_0"]["shape"]) == [1, model.config.num_key_value_heads, CACHE, model.config.head_dim]
    ops = {op["op_name"] for op in interpreter._get_ops_details()}
    assert not {op for op in ops if op.startswith("Flex") or op == "CUSTOM"}
    assert f'key = "{METADATA_KEY}"' in text
    # Decode's attention: global layers read the whole cache, sliding layers only their window
    # of it (CacheLayout.read_span), whatever the cache length.
    subgraph = interpreter._interpreter.GetSubgraphIndexFromSignature("decode")
    assert subgraph == 0, "decode is no longer the first subgraph: read its ops another way"
    read = {int(interpreter._get_tensor_details(op["inputs"][1], subgraph)["shape"][2])
            for op in interpreter._get_ops_details() if op["op_name"] == "BATCH_MATMUL"}
    assert read == {CACHE, model.config.sliding_window_size}


def test_unused_rows_past_the_end_of_the_cache_leave_every_position_intact(bundle, tmp_path):
    """The trap: the engine fills a bucket's unused rows with token 0 at position 0.

    A last chunk of 2 tokens in an 8-row bucket at position 60 of a 64-position
    cache: its 6 unused rows must not land on (wrap onto) positions 0..3.
    """
    from ai_edge_litert.interpreter import Interpreter
    from litert_lm_builder import litertlm_builder

    path, model = bundle
    litertlm_builder.unpack(path, str(tmp_path))
    (tflite,) = [n for n in os.listdir(tmp_path) if n.endswith(".tflite")]
    interpreter = Interpreter(model_path=str(tmp_path / tflite))
    rng = np.random.default_rng(0)
    ids = [2] + [int(i) for i in rng.integers(3, model.config.vocabulary_size, CACHE - 2)]  # 63 tokens
    decode = interpreter.get_signature_runner("decode")
    caches = {name: np.zeros(detail["shape"], np.float32)
              for name, detail in decode.get_input_details().items() if name.startswith("kv_cache")}
    start = 0
    for bucket in (4, *[8] * 8):  # chunks at 0, 4, 12, ..., 60: the last has 2 real rows
        real = ids[start: min(start + bucket, len(ids) - 1)]
        tokens, positions = np.zeros((1, bucket), np.int32), np.zeros((bucket,), np.int32)
        tokens[0, : len(real)], positions[: len(real)] = real, np.arange(start, start + len(real))
        caches = interpreter.get_signature_runner(f"prefill_{bucket}")(tokens=tokens, input_pos=positions, **caches)
        start += len(real)
    assert start == len(ids) - 1 == CACHE - 2
    logits = decode(tokens=np.array([[ids[-1]]], np.int32), input_pos=np.array([start], np.int32), **caches)["logits"]
    expected = np.asarray(model({"token_ids": np.array([ids])}))[0, -1]
    np.testing.assert_allclose(logits[0, 0], expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("prompt", [SHORT, LONG, "fill"], ids=["short", "longer_than_window_and_buckets",
                                                           "to_the_end_of_the_cache"])
def test_engine_text_equals_generate(bundle, engine, prompt):
    _, model = bundle
    if prompt == "fill":  # its last prefill chunk has unused rows past the end of the cache
        prompt = model.tokenizer.detokenize(_ids(model, LONG * 3, bos=False)[: CACHE - 5])
    ids = _ids(model, prompt, bos=True)
    assert len(ids) > 2 * max(BUCKETS) or prompt == SHORT
    budget = CACHE - len(ids)
    expected = _generated_ids(model, ids, budget)
    assert len(expected) >= min(budget, 8)  # random weights: the reply runs long enough to mean something
    text = "".join(engine.stream(prompt, max_new_tokens=budget))
    assert text == model.tokenizer.detokenize(expected)


def test_two_chat_turns_in_one_session_continue_the_cached_conversation(bundle, engine):
    """Turn 2's reply is `generate` over the ids the engine holds: turn 1, its reply, turn 2."""
    _, model = bundle
    chat = engine.start_chat(max_new_tokens=6)
    try:
        first = chat.turn_text("Hi")
        reply_1 = "".join(chat.send("Hi"))
        ids = _ids(model, first, bos=True)
        generated = _generated_ids(model, ids, 6)
        assert reply_1 == model.tokenizer.detokenize(generated)
        second = chat.turn_text("Why?")
        assert second.startswith("<end_of_turn>\n<start_of_turn>user\n")  # the reply was cut by the budget
        reply_2 = "".join(chat.send("Why?"))
    finally:
        chat.close()
    transcript = ids + generated + _ids(model, second, bos=False)
    assert reply_2 == model.tokenizer.detokenize(_generated_ids(model, transcript, 6))


def test_int8_bundle_agrees_with_float_on_teacher_forced_top1(tmp_path, Runner):
    """The demo teacher's held-out text: the bundle's int8 graph against the float model, >= 95%."""
    if not ON_TF:
        pytest.skip("in-process export under TensorFlow")
    from litert_lm_builder import litertlm_builder

    model = keras_gemma2.from_preset("gemma2_demo_teacher", dtype="float32")
    path = str(tmp_path / "teacher.litertlm")
    keras_gemma2.export(model, path, quantization="int8", cache_length=256, prefill_lengths=(32,))
    # The runner drives the bundle's own .tflite with the description stored in the bundle.
    toml = litertlm_builder.unpack(path, str(tmp_path / "unpacked"))
    with open(toml) as f:
        line = next(line for line in f if METADATA_KEY in line)
    description = json.loads(json.loads(line.split("value = ", 1)[1].rsplit(" }", 1)[0]))
    (tflite,) = [n for n in os.listdir(tmp_path / "unpacked") if n.endswith(".tflite")]
    os.replace(tmp_path / "unpacked" / tflite, tmp_path / "teacher.tflite")
    description["files"] = {"model": "teacher.tflite", "tokenizer": None}
    with open(tmp_path / "teacher.json", "w") as f:
        json.dump(description, f)
    runner = Runner.load(str(tmp_path / "teacher.tflite"))

    with open(os.path.join(registry.get("gemma2_demo_teacher")["local"], "held_out.txt"), encoding="utf-8") as f:
        ids = _ids(model, f.read()[:3000], bos=True)[:200]
    predicted = runner.teacher_forced_argmax(ids)
    reference = np.asarray(model({"token_ids": np.array([ids])}))[0].argmax(-1)[:-1]
    agreement = float(np.mean(predicted == reference))
    assert agreement >= 0.95, agreement


def test_int4_bundle_runs_in_the_engine_as_in_the_runner(tmp_path, Runner):
    """int4 blocks and an int4 token table (the lookup's GATHER reads INT4, the tied projection the
    same table): the engine loads the bundle, and its greedy text is the runner's on the bundle's .tflite."""
    if not ON_TF:
        pytest.skip("in-process export under TensorFlow")
    from litert_lm_builder import litertlm_builder
    from tensorflow.lite.python import schema_py_generated as schema

    model = keras_gemma2.from_preset("gemma2_demo_teacher", dtype="float32")
    path = str(tmp_path / "teacher.litertlm")
    keras_gemma2.export(model, path, quantization="int4", cache_length=128, prefill_lengths=(16,))
    prompt = "def fib(n):"
    engine = litertlm_engine.BundleEngine(path, threads=2, cache_dir=str(tmp_path / "xnnpack"))
    try:
        text = "".join(engine.stream(prompt, max_new_tokens=24))
    finally:
        engine.close()

    unpacked = tmp_path / "unpacked"
    toml = litertlm_builder.unpack(path, str(unpacked))
    with open(toml) as f:
        line = next(line for line in f if METADATA_KEY in line)
    description = json.loads(json.loads(line.split("value = ", 1)[1].rsplit(" }", 1)[0]))
    (tflite,) = [n for n in os.listdir(unpacked) if n.endswith(".tflite")]
    (spiece,) = [n for n in os.listdir(unpacked) if n.endswith(".spiece")]
    raw = np.fromfile(unpacked / tflite, np.uint8)
    flatbuffer = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(raw, 0))
    int4 = {t.name for subgraph in flatbuffer.subgraphs for t in subgraph.tensors
            if t.type == schema.TensorType.INT4}
    assert b"token_embedding/int4_table" in int4 and b"decoder_block_3/down" in int4
    description["files"] = {"model": tflite, "tokenizer": spiece}
    with open(unpacked / (os.path.splitext(tflite)[0] + ".json"), "w") as f:
        json.dump(description, f)
    expected = Runner.load(str(unpacked / tflite)).generate(prompt, max_new_tokens=24)
    assert len(expected) > 20 and text == expected, (text, expected)


def test_cli_run_and_chat_stream_the_engine(bundle, engine, capsys, monkeypatch):
    path, model = bundle
    assert cli.main(["run", path, SHORT, "--max-new-tokens", "5", "--threads", "2"]) == 0
    expected = model.tokenizer.detokenize(_generated_ids(model, _ids(model, SHORT, bos=True), 5))
    assert capsys.readouterr().out == expected + "\n"

    lines = iter(["Hello there", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert cli.main(["chat", path, "--max-new-tokens", "6"]) == 0
    # The reply is `generate`'s over the chat turn's ids (the engine's own rendering of the turn).
    chat = engine.start_chat(max_new_tokens=6)
    turn = chat.turn_text("Hello there")
    chat.close()
    assert turn == model.tokenizer.apply_chat_template([{"role": "user", "content": "Hello there"}])
    reply = model.tokenizer.detokenize(_generated_ids(model, _ids(model, turn, bos=True), 6))
    assert len(reply) > 2 and f"model> {reply}\n" in capsys.readouterr().out


def test_cli_export_writes_a_bundle_that_cli_run_continues_like_generate(tmp_path, capsys):
    """`keras-gemma2 export --preset gemma2_demo out.litertlm`, then `keras-gemma2 run out.litertlm`."""
    if not ON_TF:
        pytest.skip("in-process export under TensorFlow (the child process is tested below)")
    path = str(tmp_path / "demo.litertlm")
    assert cli.main(["export", "--preset", "gemma2_demo", path, "--cache-length", "64",
                     "--prefill-lengths", "16"]) == 0
    assert capsys.readouterr().out == f"wrote {path}\n"
    assert sorted(os.listdir(tmp_path)) == ["demo.litertlm"]
    assert cli.main(["run", path, "def fib(n):", "--max-new-tokens", "12"]) == 0
    model = keras_gemma2.from_preset("gemma2_demo", dtype="float32")
    expected = model.generate("def fib(n):", max_new_tokens=12, sampler="greedy")
    assert capsys.readouterr().out == expected + "\n"


@pytest.mark.parametrize("argv, message", [
    (["run", "missing.litertlm", "x"], "does not exist"),
    (["run", "model.tflite", "x"], "is not a .litertlm bundle"),
    (["run", "{bundle}", "x", "--max-new-tokens", "0"], "max_new_tokens=0"),
    (["chat"], "chat needs a model"),
    (["chat", "{bundle}", "--min-p", "0.1"], "not available in the LiteRT-LM engine"),
])
def test_cli_errors_are_one_line(bundle, argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [a.format(bundle=bundle[0]) for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_export_from_another_backend_writes_a_bundle_the_engine_runs(tiny_text_preset, tmp_path):
    """Under JAX / PyTorch the export runs in a TensorFlow child; the engine gives `generate`'s text."""
    if ON_TF:
        pytest.skip("the TensorFlow backend exports in-process (the tests above)")
    _, model = tiny_text_preset
    path = str(tmp_path / "tiny.litertlm")
    keras_gemma2.export(model, path, cache_length=CACHE, prefill_lengths=BUCKETS)
    assert sorted(os.listdir(tmp_path)) == ["tiny.litertlm"]  # one file: nothing beside it
    engine = litertlm_engine.BundleEngine(path, threads=2, cache_dir=str(tmp_path / "xnnpack"))
    try:
        text = "".join(engine.stream(LONG, max_new_tokens=8))
    finally:
        engine.close()
    assert text == model.tokenizer.detokenize(_generated_ids(model, _ids(model, LONG, bos=True), 8))


def test_cut_or_damaged_bundles_are_refused_in_one_line_before_the_engine_sees_them(bundle, tmp_path):
    """The engine aborted the process (SIGABRT, a native stack trace) on a file cut short.
    Every cut, and garbage in the section table, is one `error:` line and exit 2, for run
    and chat; checked in a child process, since the failure being guarded is an abort."""
    with open(bundle[0], "rb") as f:
        data = f.read()
    header_end = int.from_bytes(data[24:32], "little")
    damaged = bytearray(data)
    damaged[40:header_end] = b"\xff" * (header_end - 40)
    files = {"20KB": data[:20_000], "half": data[: len(data) // 2], "last_550": data[:-550],
             "header_only": data[:100], "not_a_bundle": b"hello", "damaged_table": bytes(damaged)}
    for name, content in files.items():
        (tmp_path / f"{name}.litertlm").write_bytes(content)
    script = (
        "import sys\nfrom keras_gemma2 import cli\n"
        "for name in sys.argv[1:]:\n"
        "    print(name, cli.main(['run', name + '.litertlm', 'x']), cli.main(['chat', name + '.litertlm']))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, *files], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "KERAS_BACKEND": "jax"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:-1] == [f"{name} 2 2" for name in files]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 * len(files)
    assert all(("cut short" in e or "damaged" in e or "not a LiteRT-LM bundle" in e) and "export it again" in e
               for e in errors), errors


def test_an_upper_case_suffix_runs_like_the_lower_case_one(bundle, engine, tmp_path, capsys):
    upper = tmp_path / "TINY.LITERTLM"
    shutil.copyfile(bundle[0], upper)
    assert cli.main(["run", str(upper), SHORT, "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out == "".join(engine.stream(SHORT, max_new_tokens=5)) + "\n"


def test_budgets_past_the_cache_are_refused_and_a_full_chat_cache_is_said(bundle, engine, capsys, monkeypatch):
    """The engine stopped at the end of its cache with exit 0 and no notice."""
    path, model = bundle
    prompt_length = len(_ids(model, SHORT, bos=True))
    assert cli.main(["run", path, SHORT, "--max-new-tokens", str(CACHE - prompt_length + 1)]) == 2
    err = capsys.readouterr().err
    assert f"use --max-new-tokens {CACHE - prompt_length} or less" in err and err.count("\n") == 1
    # The largest budget that fits is decoded in full.
    text = "".join(engine.stream(SHORT, max_new_tokens=CACHE - prompt_length))
    assert text == model.tokenizer.detokenize(_generated_ids(model, _ids(model, SHORT, bos=True),
                                                             CACHE - prompt_length))

    lines = iter(["Hello there", "and then?", "/reset", "Hello there", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert cli.main(["chat", path, "--max-new-tokens", "60"]) == 0
    out, err = capsys.readouterr()
    # The first reply ran into the end of the cache; the next message is refused, and the
    # conversation goes on (/reset, then the same message again).
    assert err.count("cache of 64 tokens is full") == 2
    assert err.count("does not fit what is left of the bundle's cache") == 1
    assert "Traceback" not in err and out.count("model> ") == 2
