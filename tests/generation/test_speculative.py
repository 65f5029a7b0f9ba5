"""generate(draft_model=...): speculative decoding is plain greedy token for token, and samples
from exactly the target's distribution."""

import keras
import numpy as np
import pytest

from helpers import TINY, backend_traces, tiny
from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM, backend
from keras_gemma2.generation import speculative

WINDOW = TINY.sliding_window_size  # 4: every test runs far past it


def copy_of(model):
    twin = Gemma2CausalLM(Gemma2Backbone(model.config))
    twin.set_weights(model.get_weights())
    return twin


def noisy_copy(model, noise, seed=0):
    """The model's weights plus Gaussian noise of `noise` x each weight's spread: a draft that
    agrees with the target on some tokens and not on others."""
    twin = copy_of(model)
    rng = np.random.default_rng(seed)
    for variable in twin.trainable_variables:
        value = keras.ops.convert_to_numpy(variable)
        variable.assign((value + rng.normal(0, noise * np.std(value), value.shape)).astype("float32"))
    return twin


@pytest.fixture(scope="module")
def pair(tiny_model):
    """(target, draft): the shared tiny model, and a noisy copy of it that it partly accepts.

    The tiny model's greedy path is chaotic (randomize_weights' large post-norm scales): 1% noise
    keeps 40-60% of a 3-row batch's proposals, 3% already fewer than 15%."""
    return tiny_model, noisy_copy(tiny_model, 0.01, seed=5)


PROMPTS = [[3, 17, 29], [5, 9, 44, 81, 2, 60, 71, 8, 33], [100, 4]]


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_is_plain_greedy_token_for_token(pair, k):
    target, draft = pair
    steps = 3 * WINDOW + 5
    plain = target.generate(PROMPTS, max_new_tokens=steps, stop_token_ids=())
    fast = target.generate(PROMPTS, max_new_tokens=steps, stop_token_ids=(), draft_model=draft, num_draft_tokens=k)
    assert [row.tolist() for row in fast] == [row.tolist() for row in plain]
    if k == 3:  # One prompt alone (once: another batch size compiles another program pair).
        alone = target.generate(PROMPTS[1], max_new_tokens=steps, stop_token_ids=(), draft_model=draft,
                                num_draft_tokens=k)
        assert alone.tolist() == plain[1].tolist()  # no other row held its acceptance back
    # The draft was partly right: both paths (keeping drafts, the target's own token) ran.
    stats = target.generator.last_speculation
    assert 0 < stats["accepted"] < stats["drafted"], stats


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


@pytest.mark.skipif(not backend.compiles(), reason="PyTorch runs generation eagerly: nothing compiles")
def test_programs_are_reused(pair):
    target, draft = pair
    before = target.generator.compilations, backend_traces(target.generator)
    target.generate(PROMPTS[0], max_new_tokens=9, draft_model=draft, num_draft_tokens=2)
    first = target.generator.compilations, backend_traces(target.generator)
    assert first[0] - before[0] == first[1] - before[1] == 2  # prefills + the rounds' loop
    for budget, stops in ((5, ()), (12, (3,)), (7, (9, 10))):
        target.generate(PROMPTS[2], max_new_tokens=budget, stop_token_ids=stops, draft_model=draft,
                        num_draft_tokens=2)
    assert (target.generator.compilations, backend_traces(target.generator)) == first


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


SETTINGS = {"temperature": 0.7, "top_k": 3}  # temperature and a filter: p and q are filtered too


@pytest.fixture(scope="module")
def sampling_models():
    """(target, near draft, far draft) over an 8-token vocabulary, so P(3 tokens) is computable."""
    config = TINY.replace(vocabulary_size=VOCABULARY)
    target = tiny(config, seed=1)
    near = noisy_copy(target, 0.05)  # a draft that mostly agrees: rounds keep several tokens
    far = tiny(config.replace(num_layers=1), seed=9)  # one that mostly disagrees: resampling
    return target, near, far, exact_joint(target, SETTINGS, 3)


def chi_square(target, draft, exact, batch, calls):
    """(Pearson's chi-square of the sampled 3-token sequences against `exact`, its degrees of
    freedom, the threshold it must stay under, the mean acceptance rate)."""
    counts, rates = np.zeros([VOCABULARY] * 3), []
    for call in range(calls):
        rows = target.generate([PROMPT] * batch, max_new_tokens=3, stop_token_ids=(), sampler="top_k",
                               seed=call, draft_model=draft, num_draft_tokens=2, **SETTINGS)
        rates.append(target.generator.last_speculation["rate"])
        for row in rows:
            counts[tuple(row)] += 1
    assert counts[exact == 0].sum() == 0  # never a token the sampler filters out
    expected = exact * batch * calls
    # The sequences expected at least 5 times, the rest pooled in one bin.
    large = expected >= 5
    observed = np.append(counts[large], counts[~large].sum())
    predicted = np.append(expected[large], expected[~large].sum())
    dof = len(observed) - 1
    # 6 standard deviations above the chi-square mean: fails on a wrong rule, not on chance.
    return ((observed - predicted) ** 2 / predicted).sum(), dof, dof + 6 * np.sqrt(2 * dof), np.mean(rates)


def test_sampled_tokens_follow_the_targets_distribution(sampling_models):
    target, near, far, exact = sampling_models
    # Small batches let rounds keep several tokens (a batch advances by its least kept row).
    statistic, dof, threshold, near_rate = chi_square(target, near, exact, batch=4, calls=400)
    assert statistic < threshold, (statistic, dof)
    statistic, dof, threshold, far_rate = chi_square(target, far, exact, batch=64, calls=25)
    assert statistic < threshold, (statistic, dof)
    assert near_rate > 0.5 > far_rate  # both paths (keeping and resampling) were exercised


def test_the_distribution_test_catches_resampling_from_p_instead_of_p_minus_q(sampling_models, monkeypatch):
    """The mutation the test above must catch: after a rejection, draw from p, not max(0, p - q)."""
    target, _, far, exact = sampling_models
    target = copy_of(target)  # its programs are traced with the mutation
    monkeypatch.setattr(speculative, "resample_distribution", lambda p, q: p)
    statistic, dof, threshold, _ = chi_square(target, far, exact, batch=64, calls=25)
    assert statistic > threshold, (statistic, dof)
