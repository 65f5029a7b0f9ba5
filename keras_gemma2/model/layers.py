"""Gemma 2 building blocks, written with `keras.ops` only.

Read top to bottom: RMSNorm, tied embedding, rotary embedding, the
soft-capped attention layer, the GeGLU feed-forward, and the decoder block
that wires them together. The attention mask and the cache's ring rule live
in `kv_cache`; the backbone's forward wires the blocks.
"""

import contextlib
import itertools

import keras
from keras import ops

from keras_gemma2 import backend
from keras_gemma2.config import Gemma2Config
from keras_gemma2.model import kv_cache



def wide_dtype(compute_dtype):
    """The dtype for values that may exceed float16's range (max 65504).

    Gemma 2's residual stream, feed-forward products and logits overflow
    float16 on real checkpoints (the 27B is "erratic" in float16), so under a
    float16 policy they are kept in float32. bfloat16 has float32's range and
    keeps its own dtype.
    """
    return "float32" if compute_dtype == "float16" else compute_dtype


_weights_come_from_checkpoint = False
_quantization_to_build = None  # "int8" / "int4": projections and the embedding built quantized


@contextlib.contextmanager
def weights_from_checkpoint(quantization=None):
    """Layers built inside start as zeros: every weight is about to be overwritten.

    Drawing random values costs 7-16x what zeros do (building the 2B on 2 CPU
    cores: 19-47 s against 2-3 s, by backend) and they would be thrown away.
    With `quantization` ("int8" / "int4") the projections and the tied embedding
    are built quantized (codes and scales, never a float kernel), to be filled
    from a float checkpoint one tensor at a time (model/quantization.py).
    """
    global _weights_come_from_checkpoint, _quantization_to_build
    previous = _weights_come_from_checkpoint, _quantization_to_build
    _weights_come_from_checkpoint, _quantization_to_build = True, quantization
    try:
        yield
    finally:
        _weights_come_from_checkpoint, _quantization_to_build = previous


def _initializer(random):
    return "zeros" if _weights_come_from_checkpoint else random


def _policy_to_build(dtype, kind):
    """`dtype`, or inside weights_from_checkpoint(quantization=...) its quantized policy.

    The names are the ones Keras' own `quantize` gives a layer (kind "projection",
    an EinsumDense: int4 with Keras' default block size) or TiedEmbedding.quantize
    gives the table (kind "embedding"); quantization.fill_quantized checks them.
    """
    mode = _quantization_to_build
    if mode is None:
        return dtype
    source = keras.dtype_policies.get(dtype)
    prefix = mode
    if kind == "projection" and mode == "int4":
        block_size = keras.quantizers.Int4QuantizationConfig().block_size
        prefix = f"int4/{-1 if block_size is None else block_size}"
    return keras.dtype_policies.get(f"{prefix}_from_{source.name}")


def soft_cap(x, cap):
    """`cap * tanh(x / cap)`, computed in float32."""
    x = ops.cast(x, "float32")
    return ops.tanh(x / cap) * cap


# Chunks of at most this many positions put the kernel first: one-token decode steps and
# speculative verification (num_draft_tokens + 1 <= 17 positions).
KERNEL_FIRST_POSITIONS = 17
_plans = []  # product_plan's, innermost last; without one, _plan() decides by the platform
_CPU_PLAN = {"kernel_first_positions": KERNEL_FIRST_POSITIONS, "one_row": True, "float32_result": True}  # XLA:CPU's
_PLAIN = {"kernel_first_positions": 0, "one_row": False, "float32_result": False}  # a GPU's or TPU's: plain products


def _plan():
    """The product plan in force: product_plan's, else the CPU's (on_cpu) or the plain one."""
    if _plans:
        return _plans[-1]
    return _CPU_PLAN if backend.on_cpu() else _PLAIN


@contextlib.contextmanager
def product_plan(kernel_first_positions=KERNEL_FIRST_POSITIONS, one_row=True):
    """Inside, products of at most `kernel_first_positions` positions put the kernel first,
    and a single row takes the matrix-vector path only if `one_row`.

    LiteRT export traces with (1, False): its converter and weight tooling expect
    the plain product for prompt chunks (a FULLY_CONNECTED whose weights it can find).
    Its products keep Keras' own dtypes (no `float32_result_product`).
    Without a plan, products follow the platform (`_plan`).
    """
    _plans.append({"kernel_first_positions": kernel_first_positions, "one_row": one_row, "float32_result": False})
    try:
        yield
    finally:
        _plans.pop()


def is_one_row(inputs):
    """Whether rows_times_transposed takes its one-row (matrix-vector) path for `inputs`."""
    shape = inputs.shape
    return (_plan()["one_row"] and len(shape) == 3 and shape[0] == 1 and shape[1] == 1
            and backend.compiles())


def rows_times_transposed(inputs, kernel, blocks=None):
    """`inputs @ kernel^T`: [batch, seq, in] x [out, in] -> [batch, seq, out], in `inputs`' dtype.

    The kernel may be stored narrower (bfloat16, int8 codes): it is cast to
    the inputs' dtype where the product reads it. One row (batch 1 decode)
    under XLA on the CPU is `one_row_product`. For a few positions (decoding a
    batch, verifying draft tokens) the kernel is the left operand and the small
    [out, batch, seq] result is transposed: with the kernel on the right, XLA:CPU
    ran a whole batch-8 decode step ~1.5x slower and copied the transposed
    vocabulary table every step. Longer chunks (prefill, export's prompt buckets
    of 32 and more) keep the plain product. A bfloat16 product of several rows
    asks for a float32 result where the backend can (`backend.float32_result_product`).
    All of this on the CPU only: on a
    GPU or TPU the product is the plain one (`_plan`); docs/performance.md has
    the measurements. `blocks`: the kernel's `column_blocks`, which one row reads instead.
    """
    shape = inputs.shape
    seq = shape[1] if len(shape) == 3 else None
    if is_one_row(inputs):
        product = one_row_product(ops.reshape(inputs, (1, shape[2])), kernel, blocks=blocks)
        return ops.reshape(ops.cast(product, inputs.dtype), (1, 1, kernel.shape[0]))
    kernel = ops.cast(kernel, inputs.dtype)
    kernel_first = seq is not None and seq <= _plan()["kernel_first_positions"]
    if (_plan()["float32_result"] and backend.float32_result_products()
            and keras.backend.standardize_dtype(inputs.dtype) == "bfloat16"):
        if kernel_first:
            product = ops.transpose(backend.float32_result_product(kernel, inputs), (1, 2, 0))
        else:
            product = backend.float32_result_product(inputs, kernel)
        return ops.cast(product, inputs.dtype)
    if kernel_first:
        return ops.transpose(ops.einsum("fd,btd->fbt", kernel, inputs), (1, 2, 0))
    return ops.einsum("btd,fd->btf", inputs, kernel)


# XLA:CPU runs a one-row product as a loop over the kernel's rows, its cast to float32
# done in place, only while the row (float32) is under 16 KiB, its dot-fusion threshold;
# past it the whole kernel is first copied, transposed and cast, every call.
FUSED_ROW_FEATURES = 16 * 1024 // 4 - 1


def one_row_chunks(features):
    """(start, width) of the column chunks one_row_product splits `features` into: the fewest
    that fit FUSED_ROW_FEATURES, of one width where a count up to twice that divides `features`."""
    fewest = -(-features // FUSED_ROW_FEATURES)
    count = next((c for c in range(fewest, 2 * fewest + 1) if features % c == 0), fewest)
    width = -(-features // count)
    return [(start, min(width, features - start)) for start in range(0, features, width)]


def one_row_product(row, kernel, chunk_scale=None, blocks=None):
    """[1, in] float x [out, in] kernel (float32, bfloat16 or int8 codes) -> [1, out] float32.

    The kernel is read once, at memory speed, in the form XLA:CPU keeps fused:
    a float32 kernel by the plain matrix-vector product (kernel first, no copy);
    a narrower one cast inside a product of at most FUSED_ROW_FEATURES columns,
    a wider one in column chunks of that size, read from `blocks` (its
    `column_blocks`, each chunk contiguous) when given: a chunk sliced from the
    [out, in] kernel is strided, which XLA:CPU reads 2-4x slower. A chunk's
    product must not feed an add (XLA would fuse the two and copy the kernel
    again): each is scaled by `chunk_scale` ([1, out]; int8's dequantization,
    applied per chunk) or, without one, the chunks are stacked and summed by a
    product with ones.
    """
    row = ops.cast(row, "float32")
    features = kernel.shape[1]
    if features <= FUSED_ROW_FEATURES:
        product = ops.matmul(row, ops.transpose(ops.cast(kernel, "float32")))
        return product if chunk_scale is None else product * chunk_scale
    if keras.backend.standardize_dtype(kernel.dtype) == "float32" and chunk_scale is None:
        return ops.transpose(ops.matmul(kernel, ops.transpose(row)))
    chunks = one_row_chunks(features)
    if blocks is None:
        blocks = [kernel[:, start : start + width] for start, width in chunks]
    parts = [
        ops.matmul(row[:, start : start + width], ops.transpose(ops.cast(blocks[index], "float32")))
        for index, (start, width) in enumerate(chunks)
    ]
    if chunk_scale is not None:
        return sum(part * chunk_scale for part in parts)
    stacked = ops.stack([part[0] for part in parts], axis=-1)  # [out, chunks]
    return ops.matmul(stacked, ops.ones((len(parts), 1), "float32"))[None, :, 0]


def has_column_blocks(kernel):
    """Whether `column_blocks` applies: a one-row product reads `kernel` in several column
    chunks (narrower than float32, wider than FUSED_ROW_FEATURES), all of one width."""
    chunks = one_row_chunks(kernel.shape[1])
    return (keras.backend.standardize_dtype(kernel.dtype) != "float32" and len(chunks) > 1
            and len({width for _, width in chunks}) == 1)


def column_blocks(kernel):
    """[out, in] -> [chunks, out, width]: one_row_chunks' column chunks, each contiguous.

    (Stacked slices: XLA:CPU copies them ~3x faster than it transposes the reshaped kernel.)
    """
    return ops.stack([kernel[:, start : start + width] for start, width in one_row_chunks(kernel.shape[1])])


_decode_blocks = []  # reading_column_blocks' mappings, innermost last


@contextlib.contextmanager
def reading_column_blocks(blocks):
    """Inside, a one-row product of the Projection at path p reads `blocks[p]` (its
    kernel's `column_blocks`, made by `decode_column_blocks`) instead of strided chunks."""
    _decode_blocks.append(blocks)
    try:
        yield
    finally:
        _decode_blocks.pop()


def decode_column_blocks(root):
    """{path: column_blocks} for the Projections under `root` whose one-row product reads
    column chunks: made once per generation (a copy of those kernels, e.g. the 2B's down
    projections), read by every host-driven decode step (`reading_column_blocks`)."""
    return {
        layer.path: column_blocks(layer.stored_kernel)
        for layer in root._flatten_layers(include_self=False)
        if isinstance(layer, Projection) and layer.reads_column_blocks()
    }


def computed_once(row):
    """`row` unchanged, but computed before (not inside) a one-row product that reads it.

    XLA:CPU fuses an int8 kernel's cast into the one-row product (that is what
    reads it at memory speed), and with it the elementwise ops that produce the
    row, which then run once per output instead of once: an int8 projection's
    input quantization (scale, round, clip, cast) cost as much as the product.
    A gather is not fused into the product, so an identity gather computes the
    row once. Measured on AVX2 (JAX): 12 layers of the 148M model's one-row
    int8 projections 27-30 ms -> 9-10 ms; its batch-1 int8 decode 39 -> 70 tok/s
    (float32: 32; benchmarks/decode_paths.py).
    """
    return ops.take(row, ops.arange(row.shape[-1]), axis=-1)


@keras.saving.register_keras_serializable(package="keras_gemma2")
class Projection(keras.layers.EinsumDense):
    """A bias-free linear map whose kernel is [out, in], transformers' layout.

    Out-major rows make each output one dot over contiguous memory: XLA CPU's
    one-row decode matvecs read such a kernel ~1.2x faster than [in, out]
    (the down projection ~1.45x), and a batch-1 decode step is ~90% matvecs.
    Quantization and LoRA are EinsumDense's own.
    """

    def __init__(self, units, **kwargs):
        kwargs.setdefault("kernel_initializer", "glorot_uniform")
        kwargs["dtype"] = _policy_to_build(kwargs.get("dtype"), "projection")
        # The equation is fixed: `call` computes it as rows_times_transposed.
        super().__init__("btd,fd->btf", (None, units), **kwargs)
        self.units = units

    @classmethod
    def built(cls, name, units, input_dim, dtype):
        """A Projection already built for [batch, seq, input_dim] inputs."""
        layer = cls(units, dtype=dtype, name=name)
        layer.build((None, None, input_dim))
        return layer

    def build(self, input_shape):
        # [out, in], also when built quantized (a float checkpoint's kernel must have it).
        self.float_kernel_shape = (self.units, input_shape[-1])
        chosen = self.kernel_initializer  # what get_config keeps
        self.kernel_initializer = keras.initializers.get(_initializer(chosen))
        try:
            super().build(input_shape)
        finally:
            self.kernel_initializer = chosen

    @property
    def stored_kernel(self):
        """The kernel as stored: float, or int8 codes ([out, in] either way)."""
        return self._kernel

    def reads_column_blocks(self):
        """Whether a decode step's one-row product may read `column_blocks` of the stored kernel."""
        return (self.quantization_mode in (None, "int8") and not self.lora_enabled
                and has_column_blocks(self.stored_kernel))

    def _blocks(self):
        return _decode_blocks[-1].get(self.path) if _decode_blocks else None

    def call(self, inputs, training=None):
        if self.quantization_mode is not None:
            return super().call(inputs, training=training)
        return rows_times_transposed(inputs, self.kernel, None if self.lora_enabled else self._blocks())

    def _int8_call(self, inputs, training=None):
        """Keras' int8 product (inputs quantized per row, int32 sums, the same values),
        shaped as rows_times_transposed shapes it: Keras' own einsum keeps the kernel
        on the right, XLA:CPU's slow form for one row or a decode batch."""
        if training or self.lora_enabled or self.inputs_quantizer is None:
            return super()._int8_call(inputs, training=training)  # its custom gradient, LoRA
        codes, inputs_scale = self.inputs_quantizer(inputs, axis=self.quantization_axis)
        inputs_scale = self._adjust_scale_for_quant(inputs_scale, "input")
        kernel = self._kernel
        if is_one_row(codes):
            # The same whole-number sums in float32 (exact while below 2**24: up to 1040
            # input features at |code| <= 127, a relative 6e-8 beyond): XLA:CPU reads int8
            # codes cast to float32 in the product at memory speed, where its int8 x int8
            # one-row product ran several times slower (docs/performance.md).
            codes = computed_once(ops.cast(codes, "float32"))
            if kernel.shape[1] > FUSED_ROW_FEATURES:  # dequantized chunk by chunk (one_row_product)
                scale = ops.reshape(ops.multiply(inputs_scale, self.kernel_scale), (1, -1))
                x = one_row_product(ops.reshape(codes, (1, -1)), kernel, ops.divide(1.0, scale), self._blocks())
                return ops.reshape(ops.cast(x, self.compute_dtype), (1, 1, -1))
        x = ops.cast(rows_times_transposed(codes, kernel), self.compute_dtype)
        return ops.divide(x, ops.multiply(inputs_scale, self.kernel_scale))

    def quantize(self, mode=None, type_check=True, config=None):
        # EinsumDense refuses subclasses by default; this one only changes the
        # float product, so its quantized variables and calls are EinsumDense's.
        super().quantize(mode, type_check=False, config=config)

    def get_config(self):
        config = super().get_config()
        for derived in ("equation", "output_shape"):
            config.pop(derived, None)
        return {**config, "units": self.units}


def fused_product(x, projections, kernel):
    """Each of `projections` applied to `x`, as ONE product with `kernel`, their kernels stacked.

    For an export's graph, where `kernel` is one constant: one fully-connected
    op instead of several, so the input is read and its activations quantized
    once. Float kernels only.
    """
    widths = list(itertools.accumulate(p.units for p in projections))[:-1]
    return ops.split(rows_times_transposed(x, kernel), widths, axis=-1)


def stacked_kernel(projections):
    """The kernels of `projections` stacked as `fused_product` reads them: [sum of outs, in]."""
    return ops.concatenate([p.kernel for p in projections], axis=0)


def adapted_layers(root):
    """The layers under `root` that carry unmerged LoRA adapters (Keras' own `enable_lora`)."""
    return [
        layer for layer in root._flatten_layers(include_self=False)
        if getattr(layer, "lora_enabled", False)
    ]


class RMSNorm(keras.layers.Layer):
    """Root-mean-square norm in float32 with the scale applied as (1 + w)."""

    def __init__(self, epsilon=1e-6, output_dtype=None, **kwargs):
        # Inputs may be a float32 residual under a float16 policy: no autocast.
        super().__init__(autocast=False, **kwargs)
        self.epsilon = epsilon
        # None: the compute dtype. Post-norms feeding a float32 residual return float32.
        self.output_dtype = output_dtype

    def build(self, input_shape):
        self.scale = self.add_weight(
            name="scale", shape=(input_shape[-1],), initializer="zeros"
        )

    def call(self, x):
        x = ops.cast(x, "float32")
        variance = ops.mean(ops.square(x), axis=-1, keepdims=True)
        x = x * ops.rsqrt(variance + self.epsilon)
        x = x * (1.0 + ops.cast(self.scale, "float32"))
        return ops.cast(x, self.output_dtype or self.compute_dtype)

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon, "output_dtype": self.output_dtype}


# Keras-side weight quantization of the tied embedding (`model.quantize`): the
# largest code each mode stores, symmetric around zero.
EMBEDDING_QUANTIZATION_BOUNDS = {"int8": 127, "int4": 7}


def quantize_embedding_rows(table, mode, rows_per_chunk=4096):
    """Symmetric per-row quantization: (int8 codes [rows, cols], float32 scales [rows]).

    `row * scale` approximates the row; codes lie in [-127, 127] ("int8") or
    [-7, 7] ("int4", not yet packed). An all-zero row gets scale 1. Chunks of
    rows bound the float32 temporaries for large vocabularies.
    """
    bound = float(EMBEDDING_QUANTIZATION_BOUNDS[mode])
    codes, scales = [], []
    for start in range(0, table.shape[0], rows_per_chunk):
        chunk = ops.cast(table[start : start + rows_per_chunk], "float32")
        largest = ops.max(ops.abs(chunk), axis=-1)
        scale = ops.where(largest > 0, largest / bound, ops.ones_like(largest))
        code = ops.clip(ops.round(chunk / scale[:, None]), -bound, bound)
        codes.append(ops.cast(code, "int8"))
        scales.append(scale)
    return ops.concatenate(codes, axis=0), ops.concatenate(scales, axis=0)


def stored_embedding_rows(table, mode):
    """(codes as TiedEmbedding stores them, float32 scales) of table rows: int4 packs two per byte.

    Rows are independent, so a table quantized a slice of rows at a time (a
    checkpoint streamed in, model/quantization.py) gives the same bytes.
    """
    codes, scales = quantize_embedding_rows(table, mode)
    if mode == "int4":
        codes = keras.quantizers.pack_int4(codes, axis=-1)[0]
    return codes, scales


def own_policy(layer):
    """The layer's own dtype policy (its entry when it holds a DTypePolicyMap)."""
    policy = layer.dtype_policy
    if isinstance(policy, keras.dtype_policies.DTypePolicyMap):
        return policy[layer.path]
    return policy


class TiedEmbedding(keras.layers.Layer):
    """Token embedding scaled by sqrt(hidden), reused as the output projection.

    `call(token_ids)` embeds; `call(hidden, reverse=True)` projects onto the
    vocabulary and applies the final logit soft-cap, returning float32 logits.

    `quantize("int8" | "int4")` (normally through `Gemma2CausalLM.quantize`)
    replaces the float table with codes and one float32 scale per vocabulary
    row: a token's embedding is `codes[t] * scale[t]` and the logits are
    `(x @ codes^T) * scale`, then the soft-cap. int8 keeps one code per byte
    (`embeddings` [vocab, hidden] int8); int4 packs two per byte (`embeddings`
    [vocab, ceil(hidden / 2)] int8, unpacked on the fly). The scales are
    `embeddings_scale` [vocab] float32.
    """

    def __init__(self, vocabulary_size, hidden_dim, logit_soft_cap, **kwargs):
        kwargs["dtype"] = _policy_to_build(kwargs.get("dtype"), "embedding")
        super().__init__(**kwargs)
        self.vocabulary_size = vocabulary_size
        self.hidden_dim = hidden_dim
        self.logit_soft_cap = logit_soft_cap
        # Optional (int8 table [vocab, hidden], float32 row scales [vocab]) that token
        # lookups read instead of `embeddings`: the edge export's quantized lookup.
        self.int8_lookup = None
        # Optional int8 codes [vocab, hidden] the tied projection reads instead of
        # `embeddings`: the int8 export's template (edge/litert_weights) computes them at
        # run time, so the converter never holds a float copy of the table.
        self.projection_codes = None

    def build(self, input_shape=None):
        if self.quantization_mode is not None:
            # A quantized policy at construction (a saved quantized model being
            # rebuilt from its config): create the quantized variables directly.
            self.quantized_build(input_shape, self.quantization_mode)
            return
        self.embeddings = self.add_weight(
            name="embeddings",
            shape=(self.vocabulary_size, self.hidden_dim),
            initializer=_initializer(keras.initializers.VarianceScaling(
                scale=1.0, mode="fan_in", distribution="untruncated_normal"
            )),
        )

    def call(self, inputs, reverse=False):
        if reverse:
            dtype = wide_dtype(self.compute_dtype)
            if self.projection_codes is None:
                logits = rows_times_transposed(ops.cast(inputs, dtype), self.embeddings)
            else:  # the codes as the product's right operand: the converter's FULLY_CONNECTED weights
                logits = ops.einsum("btd,fd->btf", ops.cast(inputs, dtype), ops.cast(self.projection_codes, dtype))
            return soft_cap(logits, self.logit_soft_cap)
        ids = ops.cast(inputs, "int32")
        if self.int8_lookup is not None:
            table, row_scale = self.int8_lookup
            x = ops.cast(ops.take(table, ids, axis=0), "float32") * ops.take(row_scale, ids, axis=0)[..., None]
        else:
            x = ops.take(self.embeddings, ids, axis=0)
        return self._scale_embedded(x)

    def _scale_embedded(self, x):
        x = ops.cast(x, self.compute_dtype)
        # The scale is cast to the compute dtype first (bfloat16 2B: exactly 48.0).
        scale = ops.cast(ops.sqrt(float(self.hidden_dim)), self.compute_dtype)
        return x * scale

    # ---- quantization (Keras' protocol: quantize / quantized_build / _int8_call ...) ----
    def quantize(self, mode=None, type_check=True, config=None):
        # `config` (a Keras QuantizationConfig) is accepted for the protocol but not
        # used: the table always gets symmetric per-row scales, which both the lookup
        # and the tied output projection read.
        if mode not in EMBEDDING_QUANTIZATION_BOUNDS:
            raise self._quantization_mode_error(mode)
        codes, scale = stored_embedding_rows(self.embeddings.value, mode)
        source = own_policy(self).name
        del self.embeddings  # untracks the float table
        self.quantized_build(None, mode)
        self.embeddings.assign(codes)
        self.embeddings_scale.assign(scale)
        self.dtype_policy = f"{mode}_from_{source}"

    def quantized_build(self, input_shape, mode, config=None):
        if mode not in EMBEDDING_QUANTIZATION_BOUNDS:
            raise self._quantization_mode_error(mode)
        columns = self.hidden_dim if mode == "int8" else (self.hidden_dim + 1) // 2
        self.embeddings = self.add_weight(
            name="embeddings",
            shape=(self.vocabulary_size, columns),
            initializer="zeros",
            dtype="int8",
            trainable=False,
        )
        self.embeddings_scale = self.add_weight(
            name="embeddings_scale",
            shape=(self.vocabulary_size,),
            initializer="ones",
            dtype="float32",
            trainable=False,
        )
        self._is_quantized = True

    def _codes(self, packed):
        """int8 codes [..., hidden] from stored rows (unpacked in int4 mode)."""
        if self.quantization_mode == "int4":
            return keras.quantizers.unpack_int4(packed, self.hidden_dim, axis=-1)
        return packed

    def _int8_call(self, inputs, reverse=False):
        if reverse:
            dtype = wide_dtype(self.compute_dtype)
            # |code| <= 127 is exact in every float dtype, bfloat16 included; the product casts.
            logits = rows_times_transposed(ops.cast(inputs, dtype), self._codes(self.embeddings))
            logits = ops.cast(logits, "float32") * self.embeddings_scale
            return soft_cap(logits, self.logit_soft_cap)
        ids = ops.cast(inputs, "int32")
        codes = self._codes(ops.take(self.embeddings, ids, axis=0))
        row_scale = ops.take(self.embeddings_scale, ids, axis=0)
        return self._scale_embedded(ops.cast(codes, "float32") * row_scale[..., None])

    # Same math; `_codes` unpacks the two codes per byte.
    _int4_call = _int8_call

    def _quantization_mode_error(self, mode):
        return NotImplementedError(
            f"TiedEmbedding supports quantization modes {tuple(EMBEDDING_QUANTIZATION_BOUNDS)}; "
            f"got {mode!r}."
        )

    # ---- saving: an explicit variable order per mode ---------------------------------------
    def _saved_variable_names(self):
        if self.quantization_mode is None:
            return ("embeddings",)
        return ("embeddings", "embeddings_scale")

    def save_own_variables(self, store):
        if not self.built:
            return
        for index, name in enumerate(self._saved_variable_names()):
            store[str(index)] = getattr(self, name)

    def load_own_variables(self, store):
        if not self.built:
            return
        names = self._saved_variable_names()
        if len(store.keys()) != len(names):
            raise ValueError(
                f"Layer {self.name!r} ({self.quantization_mode or 'float'}) expects "
                f"{len(names)} saved variables {names}, the file holds {len(store.keys())}: "
                "it was saved from a model quantized differently (or not at all)."
            )
        for index, name in enumerate(names):
            getattr(self, name).assign(store[str(index)])

    def compute_output_spec(self, inputs, reverse=False):
        if reverse:
            shape = tuple(inputs.shape[:-1]) + (self.vocabulary_size,)
            return keras.KerasTensor(shape, dtype="float32")
        shape = tuple(inputs.shape) + (self.hidden_dim,)
        return keras.KerasTensor(shape, dtype=self.compute_dtype)

    def get_config(self):
        return {
            **super().get_config(),
            "vocabulary_size": self.vocabulary_size,
            "hidden_dim": self.hidden_dim,
            "logit_soft_cap": self.logit_soft_cap,
        }


def apply_rope(x, positions, max_wavelength):
    """Rotary position embedding, rotate-half form, angles in float32.

    x: [batch, seq, heads, head_dim]; positions: [batch, seq] absolute indices.
    """
    head_dim = ops.shape(x)[-1]
    half = head_dim // 2
    exponents = ops.arange(0, half, dtype="float32") * 2.0 / float(head_dim)
    inverse_frequencies = 1.0 / ops.power(float(max_wavelength), exponents)
    angles = ops.cast(positions, "float32")[..., None] * inverse_frequencies
    angles = ops.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = ops.cos(angles), ops.sin(angles)
    x32 = ops.cast(x, "float32")
    rotated = ops.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return ops.cast(x32 * cos + rotated * sin, x.dtype)


class Gemma2Attention(keras.layers.Layer):
    """Grouped-query attention with RoPE and soft-capped logits: one layer for every path.

    Built from the model's config. The caller (the backbone's forward)
    supplies absolute `positions` and an `attention_bias` [batch, queries,
    keys] (kv_cache.attention_bias: 0 for a visible key, a large negative
    number for a masked one) over the keys this call reads, which `reads` names:

    * "chunk": the chunk's own keys (no cache, or a prefill into an empty one);
    * "cache": the chunk is written into the cache first, then the queries
      read the whole cache in place (the decode step), or, from slot
      `span_start`, only as many slots as the bias has keys
      (kv_cache.CacheLayout.read_span);
    * "cache_and_chunk": the queries read the cache as it was plus the chunk,
      then the chunk is written (a chunk that would evict keys it still needs).

    Keys and values are head-major, [batch, kv_heads, keys, head_dim], the
    layout of the cache, a (key, value) pair. Returns `(output, cache)`; the
    cache is None without one.
    """

    # Set on an instance while an edge export traces it: query, key and value's kernels
    # stacked (stacked_kernel), read as one product.
    fused_kernel = None

    def __init__(self, config, layer_index, **kwargs):
        super().__init__(**kwargs)
        self.config = Gemma2Config.from_dict(config) if isinstance(config, dict) else config
        self.layer_index = layer_index

    @property
    def fused_projections(self):
        """The projections an export reads as one product (see fused_kernel)."""
        return (self.query, self.key, self.value)

    @property
    def sliding_window_size(self):
        """This layer's window in the model's config (None: global)."""
        config = self.config
        return config.sliding_window_size if config.is_sliding(self.layer_index) else None

    def build(self, input_shape):
        config = self.config
        q, kv, d = config.num_query_heads, config.num_key_value_heads, config.head_dim
        hidden_dim = config.hidden_dim

        # Kernels are [out, in]: query [heads * head_dim, hidden], output
        # [hidden, heads * head_dim]; heads are split off after the product.
        policy = self.dtype_policy
        self.query = Projection.built("query", q * d, hidden_dim, policy)
        self.key = Projection.built("key", kv * d, hidden_dim, policy)
        self.value = Projection.built("value", kv * d, hidden_dim, policy)
        self.attention_output = Projection.built("attention_output", hidden_dim, q * d, policy)

    def call(self, x, positions, attention_bias, cache=None, cache_index=None, reads="chunk", ring=True,
             span_start=None):
        batch, length = ops.shape(x)[0], ops.shape(x)[1]
        head_dim, wavelength = self.config.head_dim, self.config.rope_max_wavelength

        def heads(projected):
            return ops.reshape(projected, (batch, length, -1, head_dim))

        if self.fused_kernel is not None:
            query, key, value = fused_product(x, self.fused_projections, self.fused_kernel)
        else:
            query, key, value = self.query(x), self.key(x), self.value(x)
        query = apply_rope(heads(query), positions, wavelength)
        key = apply_rope(heads(key), positions, wavelength)
        # [batch, kv_heads, length, head_dim]; for one token a free reshape.
        key = ops.transpose(key, (0, 2, 1, 3))
        value = ops.transpose(heads(value), (0, 2, 1, 3))

        if cache is None:
            return self.attention_output(self._attend(query, key, value, attention_bias)), None
        key_cache, value_cache = cache

        def written():
            return (kv_cache.write(key_cache, key, cache_index, ring),
                    kv_cache.write(value_cache, value, cache_index, ring))

        if reads == "cache":
            key_cache, value_cache = written()
            read = (key_cache, value_cache)
            if span_start is not None:
                size = (attention_bias.shape[-1],)
                read = [backend.dynamic_slice(c, [0, 0, span_start, 0], c.shape[:kv_cache.SLOT_AXIS] + size + c.shape[3:])
                        for c in read]
            output = self._attend(query, *read, attention_bias)
        elif reads == "cache_and_chunk":
            both = [
                ops.concatenate([c, ops.cast(fresh, c.dtype)], axis=kv_cache.SLOT_AXIS)
                for c, fresh in ((key_cache, key), (value_cache, value))
            ]
            output = self._attend(query, *both, attention_bias)
            key_cache, value_cache = written()
        else:
            output = self._attend(query, key, value, attention_bias)
            key_cache, value_cache = written()
        return self.attention_output(output), (key_cache, value_cache)

    def _attend(self, query, key, value, attention_bias):
        config = self.config
        batch, length = ops.shape(query)[0], ops.shape(query)[1]
        kv_heads, head_dim = config.num_key_value_heads, config.head_dim
        # Query head h reads key/value head h // groups. The query is made head-major
        # ([batch, kv_heads, groups, T, head_dim]) before the products, so the larger
        # logits come out in the order softmax reads them (no transposed copy of them).
        query = ops.reshape(query, (batch, length, kv_heads, config.num_query_heads // kv_heads, head_dim))
        query = ops.transpose(query, (0, 2, 3, 1, 4))
        logits_dtype = wide_dtype(self.compute_dtype)
        # cap * tanh(q.k * scale / cap): scale / cap rides on the (small) query, so the
        # [.., T, keys] logits see one multiply fewer (an export's largest elementwise ops).
        cap = config.attention_logit_soft_cap
        query = ops.cast(query, logits_dtype) * ops.cast(config.query_pre_attn_scalar**-0.5 / cap, logits_dtype)
        logits = ops.einsum("bkgth,bksh->bkgts", query, ops.cast(key, logits_dtype))
        logits = ops.tanh(ops.cast(logits, "float32")) * cap
        logits = logits + ops.cast(attention_bias, logits.dtype)[:, None, None, :, :]
        probabilities = ops.cast(ops.softmax(logits, axis=-1), value.dtype)
        output = ops.einsum("bkgts,bksh->btkgh", probabilities, value)
        return ops.reshape(output, (batch, length, config.num_query_heads * head_dim))

    def get_config(self):
        return {**super().get_config(), "config": self.config.to_dict(), "layer_index": self.layer_index}


class Gemma2FeedForward(keras.layers.Layer):
    """GeGLU: down(gelu_tanh(gate(x)) * up(x)), built from the model's config."""

    # Set on an instance while an edge export traces it: gate and up's kernels stacked
    # (stacked_kernel), read as one product.
    fused_kernel = None

    @property
    def fused_projections(self):
        """The projections an export reads as one product (see fused_kernel)."""
        return (self.gate, self.up)

    def __init__(self, config, **kwargs):
        super().__init__(**kwargs)
        self.config = Gemma2Config.from_dict(config) if isinstance(config, dict) else config

    def build(self, input_shape):
        hidden_dim = self.config.hidden_dim
        width = self.config.intermediate_dim
        self.gate = Projection.built("gate", width, hidden_dim, self.dtype_policy)
        self.up = Projection.built("up", width, hidden_dim, self.dtype_policy)
        # The gated product and the down projection can pass float16's range.
        down_dtype = self.dtype_policy
        if self.compute_dtype == "float16":
            down_dtype = "float32"
            if isinstance(self.dtype_policy, keras.dtype_policies.DTypePolicyMap):
                # A saved quantized model: keep the per-layer entries (down's own
                # entry says "..._from_float32"), float32 for the rest.
                down_dtype = keras.dtype_policies.DTypePolicyMap("float32", dict(self.dtype_policy.items()))
        self.down = Projection.built("down", hidden_dim, width, down_dtype)

    def call(self, x):
        dtype = wide_dtype(self.compute_dtype)
        if self.fused_kernel is not None:
            gate, up = fused_product(x, self.fused_projections, self.fused_kernel)
        else:
            gate, up = self.gate(x), self.up(x)
        gate = ops.cast(ops.gelu(gate, approximate=True), dtype)
        return self.down(gate * ops.cast(up, dtype))

    def get_config(self):
        return {**super().get_config(), "config": self.config.to_dict()}


class Gemma2DecoderBlock(keras.layers.Layer):
    """Layer `layer_index` of the model: pre- and post-norm around attention and around the GeGLU.

    Built from `(config, layer_index)`, the config being the one source of
    every size; the layer index decides (through the config) whether it
    slides. `call` takes what the backbone's forward prepared: positions, the
    attention mask, and optionally this layer's cache (see Gemma2Attention).
    """

    def __init__(self, config, layer_index, **kwargs):
        # The residual stream may be float32 under a float16 policy.
        super().__init__(autocast=False, **kwargs)
        config = Gemma2Config.from_dict(config) if isinstance(config, dict) else config
        self.config = config
        self.layer_index = layer_index
        residual_dtype = wide_dtype(self.compute_dtype)

        def norm(name, output_dtype=None):
            return RMSNorm(config.layer_norm_epsilon, output_dtype, dtype=self.dtype_policy, name=name)

        self.pre_attention_norm = norm("pre_attention_norm")
        self.attention = Gemma2Attention(config, layer_index, dtype=self.dtype_policy, name="attention")
        self.post_attention_norm = norm("post_attention_norm", residual_dtype)
        self.pre_feedforward_norm = norm("pre_feedforward_norm")
        self.feedforward = Gemma2FeedForward(config, dtype=self.dtype_policy, name="feedforward")
        self.post_feedforward_norm = norm("post_feedforward_norm", residual_dtype)

    def build(self, input_shape=None):
        hidden_shape = (None, None, self.config.hidden_dim)
        for norm in (
            self.pre_attention_norm,
            self.post_attention_norm,
            self.pre_feedforward_norm,
            self.post_feedforward_norm,
        ):
            norm.build(hidden_shape)
        self.attention.build(hidden_shape)
        self.feedforward.build(hidden_shape)

    def call(self, x, positions, attention_bias, cache=None, cache_index=None, reads="chunk", ring=True,
             span_start=None):
        x = ops.cast(x, wide_dtype(self.compute_dtype))
        h = self.pre_attention_norm(x)
        h, cache = self.attention(
            h, positions, attention_bias, cache=cache, cache_index=cache_index, reads=reads, ring=ring,
            span_start=span_start,
        )
        x = x + self.post_attention_norm(h)
        h = self.feedforward(self.pre_feedforward_norm(x))
        x = x + self.post_feedforward_norm(h)
        return x if cache is None else (x, cache)

    def compute_output_spec(self, x, positions, attention_bias, cache=None, *args, **kwargs):
        hidden = keras.KerasTensor(x.shape, dtype=wide_dtype(self.compute_dtype))
        if cache is None:
            return hidden
        return hidden, tuple(keras.KerasTensor(c.shape, dtype=c.dtype) for c in cache)

    def get_config(self):
        return {**super().get_config(), "config": self.config.to_dict(), "layer_index": self.layer_index}
