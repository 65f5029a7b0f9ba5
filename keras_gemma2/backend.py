"""The only backend-specific code in the library: small, explicit checks."""

import functools
import threading

import keras
import numpy as np

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


# Inductor's CPU products for a torch.compile'd step: each matrix product is
# autotuned between its C++ GEMM template (micro-kernels generated for the shape)
# and ATen's (MKL) product. The template wins for a batch's few rows: measured on
# an AVX2 machine, the 148M benchmark model's feed-forward for 8 rows 4.96 -> 2.26 ms
# and its vocabulary table 13.8 -> 7.3 ms; its batch-8 decode ~85 -> ~113 tok/s.
# One row is a plain reduction either way. A shape's first compile takes up to ~2x
# longer (Inductor keeps its choices in its on-disk cache).
TORCH_COMPILE_OPTIONS = {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}


def compile_function(fn, variables, donate_first=False, torch_compile=False):
    """`fn` compiled with XLA where the backend can: jax.jit / tf.function(jit_compile=True).

    On JAX the model's variables become explicit inputs (a StatelessScope maps
    them), so weights are not baked into the program as constants. With
    `donate_first`, JAX reuses the first argument's buffers for the outputs
    (a decode loop updates its KV cache in place instead of copying it per
    call; the caller must not read that argument afterwards). PyTorch runs
    `fn` under no_grad, eagerly or (`torch_compile`) torch.compile'd with
    TORCH_COMPILE_OPTIONS. On JAX and TensorFlow the result's `traces()` is the
    backend's own count of the programs it traced for it (tests check the
    library's counts against it).

    XLA's default CPU dots are used for decode loops too: with [out, in]
    kernels and the kernel as the left operand (layers.rows_times_transposed)
    they beat every option tried (the plain TensorFlow graph, XLA's Eigen dots
    instead of YNNPACK).
    """
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        def stateless(values, *args):
            with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                return fn(*args)

        stateless = jax.jit(stateless, donate_argnums=(1,) if donate_first else ())

        def compiled(*args):
            return stateless([v.value for v in variables], *args)

        compiled.traces = stateless._cache_size  # JAX's own count of the programs it traced
        return compiled
    if backend == "tensorflow":
        import tensorflow as tf

        def traced(*args):
            _xla_tracing.active = True  # for dynamic_slice, while TensorFlow traces `fn`
            try:
                return fn(*args)
            finally:
                _xla_tracing.active = False

        compiled = tf.function(traced, jit_compile=True)
        compiled.traces = compiled.experimental_get_tracing_count
        return compiled
    import torch

    if torch_compile:
        # Static shapes first; a second shape recompiles dynamic.
        fn = torch.compile(fn, options=TORCH_COMPILE_OPTIONS)

    def eager(*args):
        with torch.no_grad():
            return fn(*args)

    return eager


def platform():
    """Where the backend runs this process's computations: "cpu", "gpu" or "tpu".

    The speed workarounds measured on XLA:CPU (a host-driven decode loop for a
    low-precision batch-1 model, kernel-first and matrix-vector products, the
    identity gather in int8 projections) apply only on "cpu" (`on_cpu`); on
    accelerators the plain products and the on-device loop are kept.
    """
    return _probe_platform()


@functools.lru_cache(maxsize=None)
def _probe_platform():
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        name = jax.default_backend()  # where jit places computations: "cpu", "gpu", "tpu" (or a plugin)
        return name if name in ("cpu", "tpu") else "gpu"
    if backend == "tensorflow":
        import tensorflow as tf

        if tf.config.list_logical_devices("TPU"):
            return "tpu"
        return "gpu" if tf.config.list_logical_devices("GPU") else "cpu"
    if backend == "torch":
        import torch

        # Keras places torch tensors on CUDA (or Apple's MPS) when there is one.
        if torch.cuda.is_available() or (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            return "gpu"
    return "cpu"


def on_cpu():
    """Whether the CPU-only speed workarounds apply (see `platform`)."""
    return platform() == "cpu"


def steps_from_host(model, batch_size):
    """Whether generation drives its decode loop from the host, one compiled step per token.

    PyTorch always: its loops run in Python anyway, and the step is what
    torch.compile compiles. JAX and TensorFlow for one row when any weight is
    not float32 (bfloat16, float16, int8 or int4 codes): XLA:CPU runs those
    one-row products at memory speed in a plain program (a 148M model's
    vocabulary table: 1.9x / 3.1x faster than float32 in bfloat16 / as int8 codes
    cast in the product on an AVX512 machine, 1.8x / 2x on an AVX2 one), but
    several times slower inside a while loop (benchmarks/decode_paths.py). A batch
    keeps the compiled loop: XLA hoists the conversion of int8 codes to float32
    out of the loop, where a step from the host would convert them every token
    (bfloat16's products read it unconverted on JAX, and its two paths measure
    the same at batch 8). A float32 model keeps the loop too. On a
    GPU or TPU (`on_cpu` false) the loop stays on the device: a per-token sync
    with the host is what a device loop avoids.
    """
    if keras.backend.backend() == "torch":
        return True
    return (batch_size == 1 and any(variable.dtype != "float32" for variable in model.backbone.weights)
            and on_cpu())


def torch_compiles(model):
    """Whether `model`'s generation steps are torch.compile'd: on PyTorch with `model.jit_compile`.

    Keras' own switch (`model.compile(jit_compile=True)`, or setting
    `model.jit_compile = True`); off by default as in Keras, since compiling
    takes minutes per new shape on a 2-core machine before it pays back.
    """
    return keras.backend.backend() == "torch" and bool(model.jit_compile)


def compiles():
    """Whether compile_function really compiles (jax, tensorflow) or runs eagerly (torch)."""
    return keras.backend.backend() in ("jax", "tensorflow")


def float32_result_products():
    """Whether bfloat16 products ask for a float32 result (`float32_result_product`): JAX on the CPU.

    TensorFlow's op for it (BatchMatMulV3 with Tout float32) has no CPU kernel
    outside XLA and returns float32 gradients; its bfloat16 products are kept.
    """
    return keras.backend.backend() == "jax" and on_cpu()


def float32_result_product(a, b):
    """a [..., k] . b [..., k] -> [*a's leading, *b's leading] in float32, JAX only.

    XLA:CPU multiplies bfloat16 matrices 5-10x faster when asked for a float32
    result than for a bfloat16 one, which Keras' `matmul` / `einsum` ask for
    (docs/performance.md).
    """
    import jax

    return jax.lax.dot_general(a, b, (((a.ndim - 1,), (b.ndim - 1,)), ((), ())), preferred_element_type="float32")


def stateless_categorical(logits, seed):
    """One sample per row of `logits` [batch, vocab], a pure function of `seed` ([2] int32).

    keras.random only takes tensor seeds on JAX; TensorFlow has its own
    stateless sampler, and PyTorch (eager) seeds a generator from the values.
    """
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        key = keras.ops.cast(seed, "uint32")  # a raw [2] uint32 key
        return jax.random.categorical(key, logits, axis=-1).astype("int32")
    if backend == "tensorflow":
        import tensorflow as tf

        # Gumbel-max: XLA has no stateless multinomial kernel, but has stateless uniform.
        uniform = tf.random.stateless_uniform(
            tf.shape(logits), seed=tf.cast(seed, tf.int64), minval=float(np.finfo(np.float32).tiny), maxval=1.0
        )
        return tf.cast(tf.argmax(logits - tf.math.log(-tf.math.log(uniform)), axis=-1), tf.int32)
    import torch

    first, second = (int(v) for v in seed.tolist())
    generator = torch.Generator(device=logits.device).manual_seed((first * 1_000_003 + second) % (2**63))
    probabilities = torch.softmax(logits.float(), dim=-1)
    return torch.multinomial(probabilities, 1, generator=generator)[:, 0].to(torch.int32)


def stateless_uniform(shape, seed):
    """Uniform floats in [0, 1) of `shape` (float32), a pure function of `seed` ([2] int32)."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.random.uniform(keras.ops.cast(seed, "uint32"), shape, "float32")
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.random.stateless_uniform(shape, seed=tf.cast(seed, tf.int64), dtype=tf.float32)
    import torch

    first, second = (int(v) for v in seed.tolist())
    generator = torch.Generator().manual_seed((first * 1_000_003 + second) % (2**63))
    return torch.rand(shape, generator=generator, dtype=torch.float32).to(keras.ops.convert_to_tensor(0.0).device)


_jax_slice_writers = {}
_xla_tracing = threading.local()


def dynamic_slice(x, start, shape):
    """`ops.slice(x, start, shape)` where `start` may hold tensors.

    TensorFlow's XLA bridge reads tf.slice's start as a compile-time constant:
    inside compile_function, a start computed from an input (a conversation's
    decode step reads its window at the token's index) compiled a new program
    for every value, ~1 s per token. There TensorFlow gets XLA's own dynamic
    slice; elsewhere (an export's graph, which LiteRT converts) the plain slice.
    """
    if keras.backend.backend() == "tensorflow" and getattr(_xla_tracing, "active", False):
        import tensorflow as tf
        from tensorflow.compiler.tf2xla.python import xla

        begin = tf.stack([tf.cast(value, tf.int32) for value in start])
        return xla.dynamic_slice(x, begin, tf.constant([int(size) for size in shape], tf.int32))
    return keras.ops.slice(x, start, shape)


def assign_slice(variable, start, values, axis=0):
    """variable[..., start : start + n, ...] = values along `axis`, in place.

    Keras' `assign` replaces the whole value, so filling a table slice by slice
    from numpy would hold a full numpy copy beside the variable (590 MB for the
    2B's int8 embedding). JAX updates its buffer in place when it is donated.
    """
    backend = keras.backend.backend()
    index = (slice(None),) * axis + (slice(start, start + values.shape[axis]),)
    if backend == "jax":
        import jax

        if axis not in _jax_slice_writers:
            def write(whole, part, start, axis=axis):
                return jax.lax.dynamic_update_slice_in_dim(whole, part, start, axis=axis)

            _jax_slice_writers[axis] = jax.jit(write, donate_argnums=(0,))
        values = jax.numpy.asarray(values, dtype=variable.dtype)
        variable.assign(_jax_slice_writers[axis](variable.value, values, start))
    elif backend == "tensorflow":
        variable.value[index].assign(keras.ops.cast(values, variable.dtype))
    else:
        import torch

        with torch.no_grad():
            variable.value[index].copy_(torch.as_tensor(values, dtype=variable.value.dtype))
