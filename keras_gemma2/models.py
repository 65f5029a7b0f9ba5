"""keras-hub's model names for this library's classes, so `import keras_gemma2 as keras_hub`
runs code written against keras-hub (`keras_hub.models.GemmaCausalLM.from_preset(...)`)."""

from keras_gemma2.causal_lm import Gemma2CausalLM
from keras_gemma2.model.backbone import Gemma2Backbone
from keras_gemma2.tokenizer import Gemma2Tokenizer
from keras_gemma2.training.preprocessor import Gemma2CausalLMPreprocessor

GemmaCausalLM = Gemma2CausalLM
GemmaBackbone = Gemma2Backbone
GemmaTokenizer = Gemma2Tokenizer
GemmaCausalLMPreprocessor = Gemma2CausalLMPreprocessor

__all__ = [
    "Gemma2Backbone", "Gemma2CausalLM", "Gemma2CausalLMPreprocessor", "Gemma2Tokenizer",
    "GemmaBackbone", "GemmaCausalLM", "GemmaCausalLMPreprocessor", "GemmaTokenizer",
]
