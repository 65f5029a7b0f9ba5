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


def compile_function(fn, variables):
    """`fn` compiled with XLA where the backend can: jax.jit / tf.function(jit_compile=True).

    On JAX the model's variables become explicit inputs (a StatelessScope maps
    them), so weights are not baked into the program as constants. PyTorch
    runs `fn` eagerly under no_grad.
    """
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        @jax.jit
        def stateless(values, *args):
            with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                return fn(*args)

        return lambda *args: stateless([v.value for v in variables], *args)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, jit_compile=True)
    import torch

    def eager(*args):
        with torch.no_grad():
            return fn(*args)

    return eager


def compiles():
    """Whether compile_function really compiles (jax, tensorflow) or runs eagerly (torch)."""
    return keras.backend.backend() in ("jax", "tensorflow")
