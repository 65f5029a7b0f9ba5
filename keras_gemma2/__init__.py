"""Gemma 2 as one backend-agnostic Keras 3 library."""

from keras_gemma2.version import __version__
from keras_gemma2.config import Gemma2Config
from keras_gemma2.backbone import Gemma2Backbone
from keras_gemma2.causal_lm import Gemma2CausalLM
