"""The only backend-specific code in the library: small, explicit checks."""

import keras

SUPPORTED_BACKENDS = ("jax", "tensorflow", "torch")


def check_backend():
    """Fail early, with the fix, on a Keras backend this library does not run on."""
    backend = keras.backend.backend()
    if backend not in SUPPORTED_BACKENDS:
        raise RuntimeError(
            f"keras_gemma2 does not support KERAS_BACKEND={backend!r}. "
            f"Set KERAS_BACKEND to one of {', '.join(SUPPORTED_BACKENDS)} before importing keras."
        )


def is_concrete(x):
    """True when `x` holds values (not a symbolic or traced tensor)."""
    if isinstance(x, keras.KerasTensor):
        return False
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return not isinstance(x, jax.core.Tracer)
    if backend == "tensorflow":
        import tensorflow as tf

        if isinstance(x, tf.Tensor):
            return tf.executing_eagerly() and hasattr(x, "_numpy")
        return True
    if backend == "torch":
        import torch

        if isinstance(x, torch.Tensor):
            return not (x.is_meta or torch.compiler.is_compiling())
        return True
    return True
