"""generate(): cached decoding vs the full forward, the compiled loop, samplers, stops, streaming."""

import keras
import numpy as np
import pytest

from helpers import TINY, backend_traces, randomize_weights, tiny
from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM, Gemma2Config
from keras_gemma2 import backend
from keras_gemma2.generation.generator import Generator
from keras_gemma2.model import layers
from keras_gemma2.model.kv_cache import CacheLayout
from keras_gemma2.generation.samplers import BeamSearch, Sampler

WINDOW = TINY.sliding_window_size  # 4


@pytest.fixture(scope="module")
def model(tiny_model):
    """The session's shared tiny model (tests that count compilations build their own)."""
    return tiny_model


def full_forward_logits(model, sequence):
    """Uncached forward logits [len, vocab]; right-padded to the context so one shape serves all."""
    length = model.config.max_sequence_length
    token_ids = np.zeros((1, length), "int32")
    token_ids[0, : len(sequence)] = sequence
    padding_mask = (np.arange(length) < len(sequence)).astype("int32")[None]
    logits = model({"token_ids": token_ids, "padding_mask": padding_mask})
    return keras.ops.convert_to_numpy(logits)[0, : len(sequence)].astype("float64")


def full_forward_greedy(model, prompt, steps):
    """The reference: re-run the uncached forward on the whole sequence at every step."""
    sequence = list(prompt)
    for _ in range(steps):
        sequence.append(int(full_forward_logits(model, sequence)[-1].argmax()))
    return sequence[len(prompt):]


def full_forward_log_probs(model, prompt, continuation):
    logits = full_forward_logits(model, list(prompt) + list(continuation))
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return log_probs[len(prompt) - 1 : -1]


# ---- the cache is exact ------------------------------------------------------------
def test_cached_greedy_equals_full_forward_for_three_windows(model):
    # Prompts shorter and longer than the window (the ring buffer wraps during prefill too).
    prompts = [[3, 17, 29], [5, 9, 44, 81, 2, 60, 71, 8, 33], [100, 4]]
    steps = 3 * WINDOW + 2
    generated = model.generate(prompts, max_new_tokens=steps, stop_token_ids=())
    for prompt, tokens in zip(prompts, generated):
        expected = full_forward_greedy(model, prompt, steps)
        assert tokens.tolist() == expected
        assert len(set(expected)) > 4  # the test model does not just repeat a token


def test_cache_lengths_and_bytes():
    config = Gemma2Config.from_preset("gemma2_2b_en")
    lengths = list(CacheLayout.rings(config, 8192).slots)
    assert lengths[:4] == [4096, 8192, 4096, 8192] and len(lengths) == 26
    sliding = CacheLayout.rings(config, 8192).bytes(config, 1, "bfloat16")
    full = CacheLayout.full(config, 8192).bytes(config, 1, "bfloat16")
    assert full == 26 * 8192 * 2 * 4 * 256 * 2  # layers * positions * (k, v) * kv heads * head_dim * bytes
    assert sliding / full == 0.75
    caches = CacheLayout.rings(TINY, 20).new_caches(TINY, 2, "float32")
    assert [tuple(c.shape) for pair in caches for c in pair] == [
        (2, 2, 4, 16), (2, 2, 4, 16), (2, 2, 20, 16), (2, 2, 20, 16), (2, 2, 4, 16), (2, 2, 4, 16)
    ]


def test_window_override_at_generation(model):
    prompt, steps = [7, 8, 9, 10, 11, 12], 10
    generated = model.generate([prompt], max_new_tokens=steps, stop_token_ids=(), sliding_window_size=2)
    narrow = Gemma2CausalLM(Gemma2Backbone(TINY.replace(sliding_window_size=2)))
    narrow.set_weights(model.get_weights())
    assert generated[0].tolist() == full_forward_greedy(narrow, prompt, steps)
    assert generated[0].tolist() != model.generate([prompt], max_new_tokens=steps, stop_token_ids=())[0].tolist()


def test_greedy_matches_transformers_generate(tmp_path):
    import torch

    from reference import random_hf_model, save_hf_checkpoint

    import keras_gemma2

    reference = random_hf_model(TINY, seed=11, scale=0.2)
    with torch.no_grad():  # same recipe as randomize_weights: varied continuations
        for name, parameter in reference.named_parameters():
            if "post_" in name:
                parameter.add_(5.0)
    model = keras_gemma2.from_preset(save_hf_checkpoint(reference, str(tmp_path / "hf")))
    prompt = [2, 40, 41, 42, 43, 44, 45]
    steps = 3 * WINDOW + 1
    with torch.no_grad():
        expected = reference.generate(
            torch.tensor([prompt]), max_new_tokens=steps, do_sample=False,
            eos_token_id=None, pad_token_id=0, min_new_tokens=steps,
        )[0, len(prompt):].tolist()
    ours = model.generate(prompt, max_new_tokens=steps, stop_token_ids=())
    assert ours.tolist() == expected
    assert len(set(expected)) > 4


# ---- compilation ------------------------------------------------------------------
COMPILES = pytest.mark.skipif(not backend.compiles(), reason="PyTorch runs generation eagerly: nothing compiles")


@COMPILES
def test_one_compilation_per_bucket():
    model = tiny()
    model.generate([[5, 6, 7]], max_new_tokens=8, stop_token_ids=())
    # prefill + decode loop, by the library's count and by the backend's own.
    assert model.generator.compilations == backend_traces(model.generator) == 2
    model.generate([[9, 10, 11, 12, 13, 14, 15, 16, 17, 18]], max_new_tokens=8, stop_token_ids=())
    model.generate([[1, 2]], max_new_tokens=8, stop_token_ids=())
    assert model.generator.compilations == backend_traces(model.generator) == 2  # same bucket (16): reused
    model.generate([list(range(1, 20))], max_new_tokens=8, stop_token_ids=())  # bucket 32
    assert model.generator.compilations == backend_traces(model.generator) == 4
    # Prefill runs over the prompt bucket, not over the generation length.
    assert {key[1] for key in model.generator._functions} == {16, 32}


@COMPILES
def test_one_program_pair_per_sampler_kind_across_requests():
    """Prompt length (one bucket), budget (one cache bucket), stop ids, seed and the sampler's
    numbers change on every call: nothing compiles after the first call of each sampler kind."""
    model = tiny()
    rng = np.random.default_rng(0)
    for call in range(10):
        prompt = rng.integers(1, TINY.vocabulary_size, 3 + call).tolist()  # 3..12 tokens: bucket 16
        options = dict(max_new_tokens=4 + call, stop_token_ids=rng.integers(1, 128, call % 3).tolist())
        model.generate(prompt, **options)  # 16 + 13 <= 32: one cache bucket
        model.generate(prompt, sampler="top_k", top_k=5 + call, temperature=0.5 + 0.1 * call, seed=call, **options)
        # prefill + decode, for greedy and for top-k: from the first call on, nothing new.
        assert model.generator.compilations == backend_traces(model.generator) == 4
    assert len(model.generator._functions) == 2


def test_a_budget_that_fills_the_context_keeps_one_program_pair():
    """keras-hub users pass max_length = the context: the prompt bucket was capped at context
    minus budget, so it shrank to each prompt's exact length and every length compiled a new
    prefill and decode. Left padding takes no positions; the cache drops pad indices first."""
    model = tiny()
    context = TINY.max_sequence_length
    rng = np.random.default_rng(1)
    for length in range(3, 13):  # one bucket (16)
        prompt = rng.integers(1, TINY.vocabulary_size, length).tolist()
        tokens = model.generate(prompt, max_length=context, stop_token_ids=()).tolist()
        assert len(tokens) == context - length
        if length == 3:  # the cache's earliest (pad) indices were overwritten: still exact
            assert tokens == full_forward_greedy(model, prompt, context - length)
    if backend.compiles():
        assert model.generator.compilations == backend_traces(model.generator) == 2


def test_sampling_follows_the_seeded_rule_whatever_the_budget(model):
    """Step t's token is select(logits, key [seed, t]): the same tokens for any budget or cache bucket."""
    sampler = Sampler(temperature=0.7, top_k=20, top_p=0.9)
    # Compiled as the loop is: TensorFlow's stateless random numbers differ between eager and XLA.
    select = backend.compile_function(sampler.select, [])
    prompt = [3, 17, 29]
    sequence = list(prompt)
    for step in range(9):  # the reference: the uncached forward, one step at a time
        logits = keras.ops.convert_to_tensor(full_forward_logits(model, sequence)[-1:].astype("float32"))
        token = select(logits, keras.ops.convert_to_tensor(np.array([11, step], "int32")))
        sequence.append(int(np.asarray(keras.ops.convert_to_numpy(token))[0]))
    for budget in (5, 9, 40):  # cache buckets 32, 32, 64
        tokens = model.generate(prompt, max_new_tokens=budget, sampler=sampler, seed=11, stop_token_ids=())
        assert tokens.tolist()[:9] == sequence[len(prompt) :][:budget]
    assert len(set(sequence[len(prompt):])) > 3


def test_temperatures_too_small_for_float32_sample_greedily(model):
    """Logits divided by a temperature near float32's smallest number pass its range (and
    XLA:CPU flushes a subnormal one to 0): inf and NaN logits sampled token 0 every step,
    and generate returned nothing. Below ~3e-37 a temperature is greedy; just above it,
    sampling is already one-hot and finite."""
    prompt = [3, 17, 29]
    greedy = model.generate(prompt, max_new_tokens=8, stop_token_ids=()).tolist()
    for temperature in (1e-45, 1e-38, 1e-36, 1e-30):
        result = model.generate(prompt, max_new_tokens=8, sampler="temperature", temperature=temperature,
                                seed=1, stop_token_ids=(), return_logprobs=True)
        assert result.token_ids[0].tolist() == greedy, temperature
        assert np.isfinite(result.logprobs[0]).all()
    assert Sampler(temperature=1e-38).greedy and not Sampler(temperature=1e-36).greedy


def test_no_forward_pass_after_the_last_token(monkeypatch):
    """The first token comes from prefill; a decode step only feeds a token that is kept."""
    model = tiny()
    forwards = []  # decode steps: forward passes of one token per row
    forward_pass = Gemma2Backbone.forward_pass

    def counting(self, token_ids, *args, **kwargs):
        if token_ids.shape[1] == 1:
            forwards.append(1)
        return forward_pass(self, token_ids, *args, **kwargs)

    monkeypatch.setattr(Gemma2Backbone, "forward_pass", counting)
    model.generate([[5, 6, 7]], max_new_tokens=1, stop_token_ids=())
    assert forwards == []
    if backend.compiles():
        assert model.generator.compilations == 1  # prefill only: the decode loop never ran
        return
    tokens = model.generate([5, 6, 7], max_new_tokens=6, stop_token_ids=()).tolist()
    assert len(forwards) == 5
    forwards.clear()
    stop = tokens[2]
    model.generate([[5, 6, 7]], max_new_tokens=6, stop_token_ids=[stop])
    assert len(forwards) == tokens.index(stop)  # none after the stop token
    forwards.clear()
    model.generate([5, 6, 7], max_new_tokens=6, stop_token_ids=(), sampler=BeamSearch(num_beams=2))
    assert len(forwards) == 5


# ---- samplers -----------------------------------------------------------------------
def test_samplers_that_reduce_to_greedy(model):
    prompt = [[11, 22, 33]]
    greedy = model.generate(prompt, max_new_tokens=6, stop_token_ids=())[0].tolist()
    for settings in (
        dict(sampler="top_k", top_k=1),
        dict(sampler="top_p", top_p=1e-6),
        dict(sampler="min_p", min_p=1.0),
        dict(sampler="temperature", temperature=0.0),
        dict(sampler=BeamSearch(num_beams=1)),
    ):
        assert model.generate(prompt, max_new_tokens=6, stop_token_ids=(), seed=3, **settings)[0].tolist() == greedy, settings


def test_seeded_sampling_is_reproducible_and_varies_with_the_seed(model):
    prompt = [[11, 22, 33]]
    kwargs = dict(max_new_tokens=12, stop_token_ids=(), sampler="temperature", temperature=2.0)
    first = model.generate(prompt, seed=7, **kwargs)[0].tolist()
    assert model.generate(prompt, seed=7, **kwargs)[0].tolist() == first
    others = {tuple(model.generate(prompt, seed=s, **kwargs)[0].tolist()) for s in range(8, 12)}
    assert len(others | {tuple(first)}) > 2


def test_top_k_only_picks_among_the_k_best_and_logprobs_are_exact(model):
    prompt = [4, 8, 15, 16]
    result = model.generate(
        [prompt], max_new_tokens=10, stop_token_ids=(), sampler="top_k", top_k=3,
        temperature=5.0, seed=1, return_logprobs=True,
    )
    tokens, logprobs = result.token_ids[0], result.logprobs[0]
    reference = full_forward_log_probs(model, prompt, tokens)
    for step, token in enumerate(tokens):
        assert token in np.argsort(reference[step])[-3:]
        assert logprobs[step] == pytest.approx(reference[step][token], abs=1e-4)


def test_top_p_keeps_the_nucleus(model):
    prompt = [4, 8, 15, 16]
    tokens = model.generate([prompt], max_new_tokens=10, stop_token_ids=(), sampler="top_p",
                            top_p=0.5, seed=2)[0]
    reference = np.exp(full_forward_log_probs(model, prompt, tokens))
    for step, token in enumerate(tokens):
        order = np.argsort(reference[step])[::-1]
        mass_before = np.cumsum(reference[step][order]) - reference[step][order]
        assert token in order[mass_before < 0.5]


def test_beam_search_is_exact_when_beams_cover_the_vocabulary():
    config = TINY.replace(vocabulary_size=12)
    model = tiny(config, seed=5)
    prompt = [3, 4, 5]
    result = model.generate([prompt], max_new_tokens=2, stop_token_ids=(),
                            sampler=BeamSearch(num_beams=12), return_logprobs=True)
    best, best_score = None, -np.inf
    for first in range(12):
        for second in range(12):
            lp = full_forward_log_probs(model, prompt, [first, second])
            score = lp[0][first] + lp[1][second]
            if score > best_score:
                best, best_score = [first, second], score
    assert result.token_ids[0].tolist() == best
    assert result.logprobs[0].sum() == pytest.approx(best_score, abs=1e-4)


# ---- stopping, text, streaming, chat ------------------------------------------------------
def test_rows_stop_at_their_own_stop_tokens(model):
    prompts = [[3, 17, 29], [5, 9, 44, 81]]
    free = model.generate(prompts, max_new_tokens=10, stop_token_ids=())
    stop = int(free[0][3])  # row 0's 4th token
    stopped = model.generate(prompts, max_new_tokens=10, stop_token_ids=[stop])
    assert stopped[0].tolist() == free[0][:3].tolist()
    row1 = free[1].tolist()
    expected = row1[: row1.index(stop)] if stop in row1 else row1
    assert stopped[1].tolist() == expected


@pytest.fixture(scope="module")
def text_model(tiny_text_preset):
    return tiny_text_preset[1]


def test_text_in_text_out_and_stop_strings(text_model):
    text = text_model.generate("def add(a, b):", max_new_tokens=12, stop_token_ids=())
    ids = text_model.generate([text_model.tokenizer("def add(a, b):")], max_new_tokens=12, stop_token_ids=())
    assert text == text_model.tokenizer.detokenize(ids[0])
    assert isinstance(text_model.generate(["a", "bb"], max_new_tokens=3), list)
    stop = text[3:5]
    cut = text_model.generate("def add(a, b):", max_new_tokens=12, stop_token_ids=(), stop_strings=[stop])
    assert cut == text[: text.find(stop)]


def test_streaming_yields_the_same_text_piece_by_piece(text_model):
    full = text_model.generate("for i in range(", max_new_tokens=10, stop_token_ids=())
    pieces = list(text_model.generate("for i in range(", max_new_tokens=10, stop_token_ids=(), stream=True))
    assert "".join(pieces) == full and len(pieces) > 1
    seen = []
    assert text_model.generate("for i in range(", max_new_tokens=10, stop_token_ids=(), stream=seen.append) == full
    assert seen == pieces


def test_chat_uses_the_template_and_stops_at_end_of_turn(text_model):
    tokenizer = text_model.tokenizer
    messages = [{"role": "user", "content": "Hello"}]
    prompt = tokenizer(tokenizer.apply_chat_template(messages))
    free = text_model.generate([prompt], max_new_tokens=8, stop_token_ids=())[0].tolist()
    answer = text_model.chat(messages, max_new_tokens=8, stop_token_ids=[free[2]])
    assert answer == tokenizer.detokenize(free[:2]) or free[2] in free[:2]
    # Default stop ids are looked up by piece: <eos> and <end_of_turn>.
    assert set(text_model.default_stop_token_ids()) == {tokenizer.eos_token_id, tokenizer.end_of_turn_id}


# ---- bad input: clear errors before any compilation ----------------------------------------
@pytest.mark.parametrize(
    "inputs, kwargs, message",
    [
        ([[]], {}, "Empty prompt"),
        ([list(range(1, 11))], {"max_length": 10}, r"prompt \(10 tokens\) leaves no room"),
        ([[1, 2]], {"max_length": 65}, "max_length 65 exceeds the model's max_sequence_length 64"),
        ([[1, 2]], {"max_new_tokens": 63}, r"exceeds the model's max_sequence_length 64"),
        ([[1, 2]], {"sampler": "temperature", "temperature": -1.0}, "temperature must be >= 0"),
        ([[1, 2]], {"sampler": "top_p", "top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ([[1, 2]], {"sampler": "top_p", "top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ([[1, 2]], {"sampler": "top_k", "top_k": 0}, "top_k must be a positive integer"),
        ([[1, 2]], {"sampler": "nucleus"}, "Unknown sampler 'nucleus'"),
        ([[1, 2]], {"stop_token_ids": [500]}, r"stop_token_ids \[500\] lie outside the vocabulary"),
        ([[1, 2], "text"], {}, "all strings or all token-id lists"),
        (["text", [1, 2]], {}, "all strings or all token-id lists"),
        ([[1, 200]], {}, r"Prompt token ids must lie in \[0, 128\)"),
        ([[1, 2]], {"sliding_window_size": 0}, "sliding_window_size must be an integer"),
    ],
)
def test_bad_generation_requests(model, inputs, kwargs, message):
    before = model.generator.compilations, dict(model.generator._functions)
    with pytest.raises(ValueError, match=message):
        model.generate(inputs, **kwargs)
    assert (model.generator.compilations, model.generator._functions) == before  # refused before compiling


@pytest.mark.parametrize("dtype, quantize", [("bfloat16", None), ("float32", "int8")])
def test_host_steps_read_the_wide_kernels_column_blocks(dtype, quantize, monkeypatch):
    """A down projection past XLA:CPU's fused-row size (here 6000 inputs, the 2B's 9216) is read
    by host-driven decode steps from contiguous column blocks the decode's start makes once
    (layers.decode_column_blocks): the same tokens as the compiled loop and as strided chunks."""
    if not backend.compiles():
        pytest.skip("PyTorch takes no one-row path")
    model = tiny(TINY.replace(intermediate_dim=6000), dtype=dtype)
    if quantize:
        model.quantize(quantize)
    assert backend.steps_from_host(model, 1)
    made = []
    decode_column_blocks = layers.decode_column_blocks
    monkeypatch.setattr(layers, "decode_column_blocks", lambda root: made.append(decode_column_blocks(root)) or made[-1])
    read = {}  # path -> the layers that traced a product over blocks
    blocks_of = layers.Projection._blocks
    prompt, runs = [5, 9, 44, 81, 2, 60, 71, 8, 33], {}
    for path in ("blocks", "strided", "loop"):
        def recorded_blocks(layer, path=path):
            blocks = blocks_of(layer)
            if blocks is not None:
                read.setdefault(path, set()).add(layer.path)
            return blocks

        monkeypatch.setattr(Generator, "host_steps_read_blocks", lambda self, batch, path=path: path == "blocks")
        monkeypatch.setattr(backend, "steps_from_host", lambda model, batch, path=path: path != "loop")
        monkeypatch.setattr(layers.Projection, "_blocks", recorded_blocks)
        model._generator = None
        runs[path] = model.generate([prompt], max_new_tokens=3 * WINDOW, stop_token_ids=())[0].tolist()
    assert runs["blocks"] == runs["strided"] == runs["loop"] and len(set(runs["blocks"])) > 3
    assert list(read) == ["blocks"] and len(read["blocks"]) == TINY.num_layers  # the steps read them
    downs = [f"{block.path}/feedforward/down" for block in model.backbone.decoder_blocks]
    assert made and sorted(made[0]) == sorted(downs)  # made once, and only for the wide kernels
    assert all(tuple(blocks.shape) == (2, TINY.hidden_dim, 3000) for blocks in made[0].values())


def test_empty_text_prompt(text_model):
    with pytest.raises(ValueError, match="Empty prompt"):
        text_model.generate("")


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_decode_steps_from_the_host_equal_the_compiled_loop(dtype, monkeypatch):
    """Batch 1 with bfloat16 weights decodes one compiled step at a time from the host
    (backend.steps_from_host; PyTorch always does): both loops give the same tokens past
    the window, and a stop token ends either early."""
    model = Gemma2CausalLM(Gemma2Backbone(TINY, dtype=dtype))
    randomize_weights(model)
    assert backend.steps_from_host(model, 1) == (dtype != "float32" or keras.backend.backend() == "torch")
    assert backend.steps_from_host(model, 2) == (keras.backend.backend() == "torch")
    prompt, steps = [5, 9, 44, 81, 2, 60, 71, 8, 33], 3 * WINDOW + 2
    runs = {}
    for from_host in (True, False):
        monkeypatch.setattr(backend, "steps_from_host", lambda model, batch_size, chosen=from_host: chosen)
        model._generator = None  # the programs are chosen when built
        tokens = model.generate([prompt], max_new_tokens=steps, stop_token_ids=())[0].tolist()
        stopped = model.generate([prompt], max_new_tokens=steps, stop_token_ids=[tokens[6]])[0].tolist()
        runs[from_host] = tokens, stopped
    assert runs[True] == runs[False]
    tokens, stopped = runs[True]
    assert len(set(tokens)) > 4 and stopped == tokens[: tokens.index(tokens[6])]  # the stop id is not shown


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="torch.compile is PyTorch's")
def test_torch_compiled_decode_steps_equal_eager_ones():
    """`model.jit_compile = True` (Keras' switch) torch.compiles the decode step: same tokens."""
    import torch

    model = tiny()
    prompts, steps = [[3, 17, 29], [5, 9, 44, 81, 2, 60, 71, 8, 33]], 3 * WINDOW + 2
    eager = [t.tolist() for t in model.generate(prompts, max_new_tokens=steps, stop_token_ids=())]
    eager_generator = model.generator
    model.jit_compile = True
    assert model.generator is not eager_generator  # rebuilt with a torch.compile'd step
    counters = torch._dynamo.utils.counters
    graphs, autotuned = counters["stats"]["unique_graphs"], counters["inductor"]["select_algorithm_autotune"]
    with torch._inductor.config.patch(force_disable_caches=True):  # autotune now, not from disk
        compiled = [t.tolist() for t in model.generate(prompts, max_new_tokens=steps, stop_token_ids=())]
    assert counters["stats"]["unique_graphs"] > graphs
    # The batch's products were autotuned (Inductor's C++ GEMM template against ATen's).
    assert counters["inductor"]["select_algorithm_autotune"] > autotuned
    assert compiled == eager


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_generation_uses_a_compute_dtype_cache(dtype):
    model = Gemma2CausalLM(Gemma2Backbone(TINY, dtype=dtype))
    randomize_weights(model)
    tokens = model.generate([[3, 4, 5]], max_new_tokens=6, stop_token_ids=())[0]
    assert len(tokens) == 6 and (0 <= tokens).all() and (tokens < TINY.vocabulary_size).all()
    assert model.kv_cache_bytes(1, 22) == CacheLayout.rings(TINY, 22).bytes(TINY, 1, dtype)
    assert model.kv_cache_bytes(1, 22) * 2 == CacheLayout.rings(TINY, 22).bytes(TINY, 1, "float32")
