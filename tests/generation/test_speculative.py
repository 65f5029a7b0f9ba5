"""generate(draft_model=...): speculative decoding is plain greedy token for token, and samples
from exactly the target's distribution."""

import keras
import numpy as np
import pytest

from helpers import TINY, randomize_weights
from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM

WINDOW = TINY.sliding_window_size  # 4: every test runs far past it


def tiny(config=TINY, seed=0):
    return randomize_weights(Gemma2CausalLM(Gemma2Backbone(config)), seed=seed)


@pytest.fixture(scope="module")
def pair():
    """(target, draft): the tiny architecture, the draft with two layers and its own weights."""
    return tiny(seed=0), tiny(TINY.replace(num_layers=2), seed=5)


def copy_of(model):
    twin = Gemma2CausalLM(Gemma2Backbone(model.config))
    twin.set_weights(model.get_weights())
    return twin


PROMPTS = [[3, 17, 29], [5, 9, 44, 81, 2, 60, 71, 8, 33], [100, 4]]


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_is_plain_greedy_token_for_token(pair, k):
    target, draft = pair
    steps = 3 * WINDOW + 5
    plain = target.generate(PROMPTS, max_new_tokens=steps, stop_token_ids=())
    fast = target.generate(PROMPTS, max_new_tokens=steps, stop_token_ids=(), draft_model=draft, num_draft_tokens=k)
    assert [row.tolist() for row in fast] == [row.tolist() for row in plain]
    # One prompt alone: no other row holds its acceptance back.
    alone = target.generate(PROMPTS[1], max_new_tokens=steps, stop_token_ids=(), draft_model=draft, num_draft_tokens=k)
    assert alone.tolist() == plain[1].tolist()
    stats = target.generator.last_speculation
    assert stats["rounds"] >= 1 and 0 <= stats["accepted"] <= stats["drafted"] == k * stats["rounds"]


def test_a_draft_that_agrees_is_always_accepted_and_stops_are_kept(pair):
    target, _ = pair
    same = copy_of(target)
    plain = target.generate(PROMPTS, max_new_tokens=20, stop_token_ids=(), return_logprobs=True)
    fast = target.generate(PROMPTS, max_new_tokens=20, stop_token_ids=(), draft_model=same,
                           num_draft_tokens=4, return_logprobs=True)
    stats = target.generator.last_speculation
    assert stats["rate"] == 1.0 and stats["rounds"] == 4  # 1 + 4 rounds x 5 tokens >= 20
    for a, b, la, lb in zip(plain.token_ids, fast.token_ids, plain.logprobs, fast.logprobs):
        assert a.tolist() == b.tolist()
        np.testing.assert_allclose(la, lb, atol=1e-4)
    # Each row stops at its own stop token, even in the middle of a round.
    stops = [int(row[7]) for row in plain.token_ids]
    expected = target.generate(PROMPTS, max_new_tokens=20, stop_token_ids=stops)
    got = target.generate(PROMPTS, max_new_tokens=20, stop_token_ids=stops, draft_model=same)
    assert [row.tolist() for row in got] == [row.tolist() for row in expected]
    assert any(len(row) < 20 for row in got)


def test_streaming_and_budgets_that_end_inside_a_round(pair, sentencepiece_path):
    from keras_gemma2 import Gemma2Tokenizer

    target, draft = pair
    tokenizer = Gemma2Tokenizer(sentencepiece_path)
    target, draft = copy_of(target), copy_of(draft)
    target.tokenizer, draft.tokenizer = tokenizer, tokenizer
    for budget in (1, 2, 6, 11):
        plain = target.generate("for i in", max_new_tokens=budget, stop_token_ids=())
        assert target.generate("for i in", max_new_tokens=budget, stop_token_ids=(), draft_model=draft,
                               num_draft_tokens=3) == plain
        pieces = list(target.generate("for i in", max_new_tokens=budget, stop_token_ids=(), stream=True,
                                      draft_model=draft, num_draft_tokens=3))
        assert "".join(pieces) == plain


def test_programs_are_reused(pair):
    target, draft = pair
    target.generate(PROMPTS[0], max_new_tokens=9, draft_model=draft, num_draft_tokens=2)
    before = target.generator.compilations
    for budget, stops in ((5, ()), (12, (3,)), (7, (9, 10))):
        target.generate(PROMPTS[2], max_new_tokens=budget, stop_token_ids=stops, draft_model=draft,
                        num_draft_tokens=2)
    assert target.generator.compilations == before


# ---- sampling: the output distribution is the target's ------------------------------------------
VOCABULARY = 8
PROMPT = [2, 5, 3]


def exact_joint(model, settings, length):
    """P(t_1..t_length | PROMPT) under the target's filtered distributions: [VOCABULARY] * length."""
    sequences = np.array(np.meshgrid(*[np.arange(VOCABULARY)] * length, indexing="ij")).reshape(length, -1).T
    ids = np.concatenate([np.tile(PROMPT, (len(sequences), 1)), sequences], axis=1).astype("int32")
    logits = keras.ops.convert_to_numpy(model({"token_ids": ids, "padding_mask": np.ones_like(ids)}))
    logits = logits[:, len(PROMPT) - 1 : -1].astype("float64") / settings["temperature"]
    if settings.get("top_k"):
        kth = np.sort(logits, axis=-1)[..., -settings["top_k"]][..., None]
        logits = np.where(logits < kth, -np.inf, logits)
    probabilities = np.exp(logits - logits.max(-1, keepdims=True))
    probabilities /= probabilities.sum(-1, keepdims=True)
    chosen = np.take_along_axis(probabilities, sequences[..., None], axis=-1)[..., 0]
    return chosen.prod(axis=1).reshape([VOCABULARY] * length)


def test_sampled_tokens_follow_the_targets_distribution():
    settings = {"temperature": 0.7, "top_k": 3}  # temperature and a filter: p and q are filtered too
    config = TINY.replace(vocabulary_size=VOCABULARY)
    target = tiny(config, seed=1)
    near = copy_of(target)  # a draft that mostly agrees: rounds keep several tokens
    for variable in near.trainable_variables:
        value = keras.ops.convert_to_numpy(variable)
        noise = np.random.default_rng(0).normal(0, 0.05 * np.std(value), value.shape)
        variable.assign((value + noise).astype("float32"))
    far = tiny(config.replace(num_layers=1), seed=9)  # one that mostly disagrees: resampling
    exact = exact_joint(target, settings, 3)
    acceptance = []
    # (draft, batch, calls): 800 sequences each; small batches let rounds keep several tokens.
    for draft, batch, calls in ((near, 4, 200), (far, 16, 50)):
        counts = np.zeros([VOCABULARY] * 3)
        rates = []
        for call in range(calls):
            rows = target.generate([PROMPT] * batch, max_new_tokens=3, stop_token_ids=(), sampler="top_k",
                                   seed=call, draft_model=draft, num_draft_tokens=2, **settings)
            rates.append(target.generator.last_speculation["rate"])
            for row in rows:
                counts[tuple(row)] += 1
        total = batch * calls
        assert counts[exact == 0].sum() == 0  # never a token the sampler filters out
        expected = exact * total
        # Pearson's test over the sequences expected at least 5 times, the rest pooled in one bin.
        large = expected >= 5
        observed = np.append(counts[large], counts[~large].sum())
        predicted = np.append(expected[large], expected[~large].sum())
        chi_square = ((observed - predicted) ** 2 / predicted).sum()
        dof = len(observed) - 1
        # 6 standard deviations above the chi-square mean: fails on a wrong rule, not on chance.
        assert chi_square < dof + 6 * np.sqrt(2 * dof), (chi_square, dof)
        acceptance.append(np.mean(rates))
    assert acceptance[0] > 0.5 > acceptance[1]  # both paths (keeping and resampling) were exercised
