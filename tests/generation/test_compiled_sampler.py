"""keras-hub's `compile(sampler=...)`: generate's default sampler, by name, object or keras-hub object."""

import numpy as np
import pytest

from helpers import randomize_weights
from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM, Gemma2Config, Sampler
from keras_gemma2.generation.samplers import BeamSearch, compiled_sampler

TINY = Gemma2Config.from_preset("gemma2_tiny_test")
PROMPT = np.array([[2, 17, 33, 9]], "int32")


@pytest.fixture(scope="module")
def model():
    # Small random weights: a near-uniform next-token distribution, so sampling leaves greedy's path.
    return randomize_weights(Gemma2CausalLM(Gemma2Backbone(TINY)), seed=3)


def tokens(model, **kwargs):
    return [int(t) for t in model.generate(PROMPT, max_new_tokens=6, stop_token_ids=None, **kwargs)[0]]


def test_the_compiled_sampler_becomes_generates_default(model):
    greedy = tokens(model)
    try:
        model.compile(sampler="top_k")
        sampled = {seed: tokens(model, seed=seed) for seed in range(4)}
        for seed, continuation in sampled.items():
            assert continuation == tokens(model, sampler="top_k", seed=seed)
        assert any(continuation != greedy for continuation in sampled.values())
        # A per-call sampler still wins.
        assert tokens(model, sampler="greedy") == greedy
        model.compile(sampler=Sampler(greedy=True))
        assert tokens(model) == greedy
    finally:
        model._compiled_sampler = ("greedy", None)


def test_keras_hub_sampler_objects_map_to_ours_with_their_seed():
    keras_hub = pytest.importorskip("keras_hub")
    samplers = keras_hub.samplers
    assert compiled_sampler(samplers.GreedySampler()) == (Sampler(greedy=True), None)
    assert compiled_sampler(samplers.TopKSampler(k=5, seed=2)) == (Sampler(top_k=5), 2)
    assert compiled_sampler(samplers.TopPSampler(p=0.9, k=20, seed=3, temperature=0.7)) == (
        Sampler(temperature=0.7, top_p=0.9, top_k=20), 3)
    assert compiled_sampler(samplers.RandomSampler(seed=1)) == (Sampler(), 1)
    assert compiled_sampler(samplers.BeamSampler(num_beams=3)) == (BeamSearch(num_beams=3), None)
    assert compiled_sampler("random") == (Sampler(), None)  # keras-hub's name for plain sampling


def test_a_keras_hub_top_k_sampler_samples_with_its_seed(model):
    keras_hub = pytest.importorskip("keras_hub")
    try:
        model.compile(sampler=keras_hub.samplers.TopKSampler(k=5, seed=2))
        sampled = tokens(model)
        assert sampled == tokens(model, sampler=Sampler(top_k=5), seed=2)
        # It sampled (greedy runs would also be equal), with its own seed (another seed differs).
        assert sampled != tokens(model, sampler="greedy")
        assert sampled != tokens(model, sampler=Sampler(top_k=5), seed=3)
    finally:
        model._compiled_sampler = ("greedy", None)


def test_an_unknown_sampler_is_refused_at_compile(model):
    with pytest.raises(ValueError, match="Unknown sampler 'top-k'"):
        model.compile(sampler="top-k")
    assert tokens(model) == tokens(model, sampler="greedy")  # nothing changed
