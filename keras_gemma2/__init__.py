"""Gemma 2 as one backend-agnostic Keras 3 library."""

# First, before keras is imported: the `keras-gemma2` command makes Ctrl-C exit cleanly and
# quiets the backends' start-up logs (a no-op when the package is imported as a library).
from keras_gemma2 import cli_startup as _cli_startup

_cli_startup.prepare_if_command()

from keras_gemma2.version import __version__
from keras_gemma2.config import Gemma2Config
from keras_gemma2.model.backbone import Gemma2Backbone
from keras_gemma2.causal_lm import Gemma2CausalLM
from keras_gemma2.tokenizer import Gemma2Tokenizer
from keras_gemma2.checkpoints.registry import list_presets
from keras_gemma2.generation.samplers import BeamSearch, Sampler
from keras_gemma2.edge.export import export
from keras_gemma2 import models, samplers  # keras-hub's names: `import keras_gemma2 as keras_hub`


def from_preset(preset, dtype=None, load_weights=True, quantize=None, **config_overrides):
    """A `Gemma2CausalLM` (with its tokenizer) from a preset.

    `preset`: a registered name (see `list_presets()`), a local directory in
    KerasHub or transformers format, or a `kaggle://` / `hf://` handle.
    `dtype`: 'float32', 'bfloat16', 'float16' or a mixed policy.
    `load_weights=False` builds the architecture with random weights (no download).
    `quantize`: 'int8' or 'int4' quantizes each weight as it is read, so memory
    stays near the quantized size (the same model as loading, then `quantize`).
    """
    return Gemma2CausalLM.from_preset(
        preset, dtype=dtype, load_weights=load_weights, quantize=quantize, **config_overrides
    )

__all__ = [
    "__version__",
    "export",
    "BeamSearch",
    "Gemma2Backbone",
    "Gemma2CausalLM",
    "Gemma2Config",
    "Gemma2Tokenizer",
    "Sampler",
    "from_preset",
    "list_presets",
    "models",
    "samplers",
]
