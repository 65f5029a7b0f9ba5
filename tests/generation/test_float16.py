"""float16 (Colab's T4 has no bfloat16): every generation path gives float32's greedy tokens.

The shipped demo presets under float16 against the same presets in float32, 64 new
tokens, prompts of different lengths (so rows are left-padded: a padded query sees
no key, which is where an out-of-range mask constant became NaN). The constant walk
below is backend-agnostic; the rest runs on every backend.
"""

import ast
import importlib
import pathlib
import pkgutil

import numpy as np
import pytest

import keras_gemma2
from keras_gemma2 import Gemma2CausalLM
from helpers import logits_of

PROMPTS = ["def f", "import os\nclass Foo:"]
NEW = dict(max_new_tokens=64, stop_token_ids=())
FLOAT16_MAX = float(np.finfo(np.float16).max)
FLOAT16_SMALLEST = float(np.finfo(np.float16).smallest_subnormal)


@pytest.fixture(scope="module")
def demo():
    """{dtype: gemma2_demo} for float32 and float16."""
    return {dtype: Gemma2CausalLM.from_preset("gemma2_demo", dtype=dtype) for dtype in ("float32", "float16")}


def token_lists(rows):
    return [np.asarray(row).tolist() for row in rows]


# How close two logits are for float16's rounding to swap them (float16 steps by
# 0.0078 between 8 and 16; the demo's logits lie below 30).
NEAR_TIE = 0.05


def assert_float16_greedy(f16, f32, prompts, got, expected):
    """float16's greedy tokens are float32's, except where float16's rounding flips a
    near tie; every float16 token is then still the argmax of float16's own forward."""
    for prompt, mine, theirs in zip(prompts, token_lists(got), token_lists(expected)):
        start = len(prompt) - 1
        steps = logits_of(f16, np.array([prompt + mine], "int32"))[0, start : start + len(mine)]
        chosen = steps[np.arange(len(mine)), mine]
        assert np.isfinite(steps).all() and (chosen >= steps.max(-1) - NEAR_TIE).all()
        if mine != theirs:
            first = next(t for t, (a, b) in enumerate(zip(mine, theirs)) if a != b)
            there = logits_of(f32, np.array([prompt + theirs[:first]], "int32"))[0, -1]
            gap = there[theirs[first]] - there[mine[first]]
            assert 0 <= gap < NEAR_TIE, f"float16 left float32's greedy tokens at step {first} (gap {gap})"


def test_greedy_generation_matches_float32_with_finite_logprobs(demo):
    expected = demo["float32"].generate(PROMPTS, return_logprobs=True, **NEW)
    got = demo["float16"].generate(PROMPTS, return_logprobs=True, **NEW)
    assert token_lists(got.token_ids) == token_lists(expected.token_ids)
    assert [len(row) for row in got.token_ids] == [64, 64]
    for mine, theirs in zip(got.logprobs, expected.logprobs):
        assert np.isfinite(mine).all()
        np.testing.assert_allclose(mine, theirs, atol=0.05)
    # The text path (what `keras-gemma2 generate --dtype float16` prints) is not empty.
    assert demo["float16"].generate("def f", max_new_tokens=8) == demo["float32"].generate("def f", max_new_tokens=8)


def test_mixed_float16_and_int4_generation_match_their_float32_twins():
    for dtype, quantize, reference in (("mixed_float16", None, "float32"), ("float16", "int4", "float32")):
        model = Gemma2CausalLM.from_preset("gemma2_demo", dtype=dtype, quantize=quantize)
        twin = Gemma2CausalLM.from_preset("gemma2_demo", dtype=reference, quantize=quantize)
        ids = [model.tokenizer.tokenize(p, add_bos=True) for p in PROMPTS]
        assert_float16_greedy(model, twin, ids, model.generate(ids, **NEW), twin.generate(ids, **NEW))


@pytest.fixture(scope="module")
def prompt_ids(demo):
    return [demo["float32"].tokenizer.tokenize(p, add_bos=True) for p in PROMPTS]


def test_beam_search(demo, prompt_ids):
    f16, f32 = demo["float16"], demo["float32"]
    got = f16.generate(prompt_ids, sampler="beam", **NEW)
    assert token_lists(got) == token_lists(f32.generate(prompt_ids, sampler="beam", **NEW))


def test_speculative_decoding(demo, prompt_ids):
    teacher16 = Gemma2CausalLM.from_preset("gemma2_demo_teacher", dtype="float16")
    teacher32 = Gemma2CausalLM.from_preset("gemma2_demo_teacher")
    speculative = teacher16.generate(prompt_ids, draft_model=demo["float16"], **NEW)
    plain = teacher32.generate(prompt_ids, **NEW)
    assert_float16_greedy(teacher16, teacher32, prompt_ids, speculative, plain)


def test_chat(demo):
    mine, theirs = demo["float16"].start_chat(max_new_tokens=64), demo["float32"].start_chat(max_new_tokens=64)
    for message in ("hi", "write a function"):
        reply = mine.send(message)
        assert reply and reply == theirs.send(message)


def test_scoring(demo):
    for got, expected in zip(demo["float16"].score(PROMPTS), demo["float32"].score(PROMPTS)):
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, expected, atol=0.05)


def float_literals(source):
    """(line, value) of every float literal in Python source, negation included."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, float):
            yield node.lineno, node.value


@pytest.mark.backend_agnostic
def test_no_float_constant_in_the_library_leaves_float16s_range():
    """Every float literal and module-level float fits float16 (a smaller or larger one
    becomes 0 or inf the moment it meets a float16 tensor); values that must be extreme
    are taken from the dtype they fill (`samplers.lowest`)."""
    package = pathlib.Path(keras_gemma2.__file__).parent
    outside = []
    for path in sorted(package.rglob("*.py")):
        for line, value in float_literals(path.read_text()):
            if value and not FLOAT16_SMALLEST <= abs(value) <= FLOAT16_MAX:
                outside.append(f"{path.relative_to(package)}:{line}: {value!r}")
    assert not outside, outside

    for info in pkgutil.walk_packages([str(package)], "keras_gemma2."):
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if isinstance(value, (float, np.floating)) and value and not FLOAT16_SMALLEST <= abs(value) <= FLOAT16_MAX:
                outside.append(f"{info.name}.{name} = {value!r}")
    assert not outside, outside
