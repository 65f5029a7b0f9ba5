"""Shared tiny configs and fixtures for the whole suite."""

import os

import numpy as np
import pytest

from keras_gemma2 import Gemma2Config

# Small enough to run in milliseconds, shaped like the real models: GQA,
# windows shorter than the test sequences, a 27B-style query scalar.
TINY = Gemma2Config(
    vocabulary_size=128,
    num_layers=3,
    hidden_dim=32,
    intermediate_dim=48,
    num_query_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    query_pre_attn_scalar=16,
    sliding_window_size=4,
    max_sequence_length=64,
)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
