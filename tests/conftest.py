"""Shared tiny configs and fixtures for the whole suite."""


import numpy as np
import pytest

from keras_gemma2 import Gemma2Config

# The tiny configs are registered presets (presets/gemma2_tiny_*.json): shaped
# like the real models (GQA, windows shorter than test sequences), but run in
# milliseconds. Test modules read them with Gemma2Config.from_preset.
TINY = Gemma2Config.from_preset("gemma2_tiny_test")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def sentencepiece_path(tmp_path_factory):
    """Path to a tiny 128-piece SentencePiece model with Gemma's specials."""
    from helpers import train_test_sentencepiece

    return train_test_sentencepiece(tmp_path_factory.mktemp("sentencepiece"))
