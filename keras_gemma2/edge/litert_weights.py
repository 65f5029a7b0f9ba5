"""int8 and int4 LiteRT files of any size in a few GB: convert a template, then write each block's weights.

The TFLite converter keeps every constant several times over (MLIR attributes
are never freed, and it folds norm scales into the following weights as new
copies): converting the 2B directly needs about 38 GB. `keras_gemma2.export`
therefore converts a *template*: the whole graph (every layer, every
signature) in which block l reads block l % 2's variables, so the converter
only ever holds the embedding and two blocks. The template is always converted
with the converter's int8 dynamic-range quantization. This module rewrites the
template flatbuffer so that every block gets its own weights:

* each block's fully-connected weights, folded as the converter folds them
  (the pre-norm scale 1 + w multiplies the input columns of the projections
  that follow the norm) and quantized as it quantizes them (symmetric int8
  per output channel, scale = max|w| / 127), and its post-norm scales;
  int4 (`bits=4`): the same rows as TFLite INT4 tensors (two codes a byte, the
  first in the low nibble), symmetric per output channel, scale = max|w| / 7,
  halves rounded away from zero (the layout XNNPACK's qc4w kernels run);
* blocks 0 and 1 are real in the template, so every export first checks this
  module's int8 against the converter's on them and stops if they differ;
* the tied output projection reads the token-lookup table (one copy of
  the embedding in the file, as in LiteRT's published Gemma 2), int8 or int4
  with one scale per row (`embedding_bits`; the lookup's GATHER and CAST read
  an INT4 table as they read an int8 one). In the template it reads the int8
  table's codes through a gather at run time, so the converter never holds a
  float copy of the 256k-row table (for the 2B, 2.4 GB, which it would keep
  several times over).

Weights are streamed to the output one tensor at a time (tensor data after the
flatbuffer, at the offsets the LiteRT runtime reads for files over 2 GB).
"""

import collections
import copy

import keras
import numpy as np

_ALIGNMENT = 64
# Fully-connected weight name -> (the kernel paths in a block stacked into it, the pre-norm
# folded into its input columns or None). The export traces query/key/value and gate/up as
# one product each (layers.fused_product).
PROJECTIONS = {
    "qkv": (("attention/query/kernel", "attention/key/kernel", "attention/value/kernel"), "pre_attention_norm"),
    "attention_output": (("attention/attention_output/kernel",), None),
    "gate_up": (("feedforward/gate/kernel", "feedforward/up/kernel"), "pre_feedforward_norm"),
    "down": (("feedforward/down/kernel",), None),
}
POST_NORMS = ("post_attention_norm", "post_feedforward_norm")


def template_sources(backbone):
    """What the template reads for each of `backbone.variables`: a Keras variable or an array.

    Block l reads block l % 2's variables, except its post-norm scales, which
    read `template_post_norm` values, and the final norm reads
    `template_final_norm`: with a scale at its initial 0 the converter would
    drop the multiply by 1 + 0, leaving no op to write the real scale into.
    """
    by_path = {v.path: v for v in backbone.variables}
    sources, substitutes = [], {}
    for variable in backbone.variables:
        head, _, rest = variable.path.partition("/")
        norm = rest.partition("/")[0]
        if variable.path == "final_norm/scale":
            sources.append(template_final_norm(variable.shape[0]))
        elif head.startswith("decoder_block_") and norm in POST_NORMS:
            representative = int(head[len("decoder_block_"):]) % 2
            key = (representative, norm)
            if key not in substitutes:
                substitutes[key] = template_post_norm(representative, norm, variable.shape[0])
            sources.append(substitutes[key])
        else:
            sources.append(by_path[_template_path(variable.path)])
    return sources


def template_final_norm(hidden):
    return (0.125 + 0.001 * np.arange(hidden) / hidden).astype(np.float32)


def template_post_norm(representative, name, hidden):
    """A post-norm scale w for the template: 1 + w is distinct per block and norm, never 1."""
    step = 2 * representative + POST_NORMS.index(name) + 1
    return (0.25 * step + 0.001 * np.arange(hidden) / hidden).astype(np.float32)


def _template_path(path):
    head, _, rest = path.partition("/")
    if head.startswith("decoder_block_"):
        return f"decoder_block_{int(head[len('decoder_block_'):]) % 2}/{rest}"
    return path


def quantize_channels(weights, bits=8):
    """Symmetric per row (output channel): (int8 codes [out, in], float32 scale [out]).

    `bits` 8: codes in [-127, 127], scale = max|w| / 127 (the converter's int8);
    4: codes in [-7, 7], scale = max|w| / 7 (write them with `pack_int4`).
    """
    limit = np.float32(2 ** (bits - 1) - 1)
    weights = np.asarray(weights, np.float32)
    scale = np.abs(weights).max(axis=1) / limit
    safe = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    # Halves round away from zero, like the converter (std::round); numpy's rint rounds
    # them to even, and weights that came from bfloat16 land on halves often.
    scaled = (weights / safe[:, None]).astype(np.float64)
    return np.clip(np.trunc(scaled + np.copysign(0.5, scaled)), -limit, limit).astype(np.int8), safe


# int4 is channel-wise (one float32 scale per output row), not the schema's blockwise
# quantization (BlockwiseQuantization: float16 scales per block of 32 or 64 inputs), though both
# load and run in ai_edge_litert 2.3.0 and in the LiteRT-LM 0.18.1 engine (the demo teacher's
# greedy text is the interpreter's). Measured here (AMD EPYC, XNNPACK, 1 thread, median of 7
# interleaved rounds; an FC-only 2048 x 8192 x 2048 stack, 2 layers, 67M int4 weights, four
# copies so the weights come from DRAM): per decode row 2.19 ms channel-wise, 2.84 ms block 32,
# 2.67 ms block 64; a 32-row prefill 13.0 / 18.8 / 15.2 ms (2 threads: 2.32 / 2.60 / 2.35 ms,
# 13.6 / 18.4 / 16.2 ms); files 34.0 / 37.8 / 35.7 MB.
def pack_int4(codes):
    """int8 codes in [-8, 7] -> TFLite INT4 bytes: element 2i in the low nibble of byte i,
    2i + 1 in the high one, over the flattened tensor (what ai-edge-quantizer writes and
    LiteRT reads)."""
    flat = np.asarray(codes, np.int8).reshape(-1).view(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] & 0x0F) | (flat[1::2] << 4)


def _stored(codes, bits):
    """The bytes of a tensor of int8 `codes` stored with `bits` bits a code."""
    return codes if bits == 8 else pack_int4(codes)


def _tensor_type(schema, bits):
    return schema.TensorType.INT8 if bits == 8 else schema.TensorType.INT4


def quantize_rows(variable, rows_per_chunk=8192, bits=8):
    """Symmetric per row of a Keras variable, a chunk of rows at a time (the 2B's
    table is 2.4 GB in float32): (int8 codes [rows, cols], float32 scales [rows])."""
    rows = variable.shape[0]
    codes, scales = np.empty(variable.shape, np.int8), np.empty((rows,), np.float32)
    for start in range(0, rows, rows_per_chunk):
        chunk = keras.ops.convert_to_numpy(variable[start : start + rows_per_chunk])
        codes[start : start + len(chunk)], scales[start : start + len(chunk)] = (
            quantize_channels(chunk, bits)
        )
    return codes, scales


class BlockWeights:
    """A backbone's per-block weights in the converter's layout ([out, in], folds applied)."""

    def __init__(self, backbone):
        self._variables = {v.path: v for v in backbone.variables}
        self.config = backbone.config

    def value(self, path):
        return np.asarray(keras.ops.convert_to_numpy(self._variables[path]), np.float32)

    def projection(self, block, name):
        kernel_paths, norm = PROJECTIONS[name]
        # Projection kernels are [out, in] already: stacked, they are the fused product's.
        weights = np.concatenate([self.value(f"decoder_block_{block}/{path}") for path in kernel_paths])
        if norm is not None:
            weights = weights * (np.float32(1.0) + self.value(f"decoder_block_{block}/{norm}/scale"))[None, :]
        return np.ascontiguousarray(weights, np.float32)

    def post_norm(self, block, name):
        return np.float32(1.0) + self.value(f"decoder_block_{block}/{name}/scale")

    def embedding_row_scales(self):
        """The token-lookup table's per-row scales (those of the template's int8 table)."""
        return quantize_rows(self._variables["token_embedding/embeddings"])[1]

    def embedding_rows(self, bits, rows_per_chunk=8192):
        """The token-lookup table quantized per row, as stored: (int8 codes [vocab, hidden], or
        for 4 bits their INT4 bytes, float32 scales [vocab]); a chunk of rows at a time (the
        2B's int4 table is 295 MB, its int8 codes are never all held)."""
        table = self._variables["token_embedding/embeddings"]
        if bits == 8:
            return quantize_rows(table, rows_per_chunk)
        rows, columns = table.shape
        stored, scales = np.empty(((rows * columns + 1) // 2,), np.uint8), np.empty((rows,), np.float32)
        for start in range(0, rows, rows_per_chunk - rows_per_chunk % 2):  # whole bytes per chunk
            chunk = keras.ops.convert_to_numpy(table[start : start + rows_per_chunk - rows_per_chunk % 2])
            codes, scales[start : start + len(chunk)] = quantize_channels(chunk, bits)
            packed = pack_int4(codes)
            stored[start * columns // 2 : start * columns // 2 + packed.size] = packed
        return stored, scales

    def final_norm(self):
        return np.float32(1.0) + self.value("final_norm/scale")


class _Template:
    """A converted template .tflite, memory-mapped (tensor data stays on disk)."""

    def __init__(self, path):
        from tensorflow.lite.python import schema_py_generated as schema

        self.schema = schema
        self.raw = np.memmap(path, np.uint8, mode="r")
        self.model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(self.raw, 0))
        for subgraph in self.model.subgraphs:  # editable index lists (not read-only views)
            for op in subgraph.operators:
                op.inputs = [int(i) for i in op.inputs]
                op.outputs = [int(i) for i in op.outputs]
        self.codes = [
            max(code.builtinCode, code.deprecatedBuiltinCode) for code in self.model.operatorCodes
        ]

    def data(self, buffer_index):
        buffer = self.model.buffers[buffer_index]
        if buffer.offset and buffer.offset > 1:
            return self.raw[buffer.offset : buffer.offset + buffer.size]
        return np.asarray(buffer.data if buffer.data is not None else [], np.uint8)

    def has_data(self, buffer_index):
        buffer = self.model.buffers[buffer_index]
        return (buffer.offset and buffer.offset > 1 and buffer.size) or (
            buffer.data is not None and len(buffer.data)
        )

    def array(self, tensor):
        dtype = {self.schema.TensorType.INT8: np.int8, self.schema.TensorType.FLOAT32: np.float32}[tensor.type]
        return self.data(tensor.buffer).view(dtype).reshape(tuple(int(d) for d in tensor.shape))


def _agrees(q, scale, reference):
    """The converter's int8 and ours: same scales, values within 1 step, >= 99% equal.

    (The converter's float arithmetic differs from numpy's in the last bit now and
    then, which moves a value sitting near a half step: 0.1-0.3% of a trained
    model's weights. Any other weight differs almost everywhere.)"""
    ref_q, ref_scale = reference
    if q.shape != ref_q.shape or not np.allclose(scale, ref_scale, rtol=1e-5, atol=0):
        return False
    difference = np.abs(q.astype(np.int16) - ref_q.astype(np.int16))
    return difference.max() <= 1 and np.count_nonzero(difference) <= max(1, q.size // 100)


def stitch(template_path, output_path, backbone, bits=8, embedding_bits=None):
    """Write `output_path`: the int8 template with every block's own weights. Returns its size.

    `bits`: 8 or 4, the blocks' fully-connected weights; `embedding_bits`: the
    token table's (lookup and tied projection), None: `bits`.
    """
    if bits not in (8, 4) or embedding_bits not in (None, 8, 4):
        raise ValueError(f"LiteRT stitching writes 8- or 4-bit weights, not {bits} / {embedding_bits}.")
    embedding_bits = embedding_bits or bits
    template = _Template(template_path)
    schema = template.schema
    ops_enum = schema.BuiltinOperator
    model = template.model
    config = backbone.config
    weights = BlockWeights(backbone)
    representatives = range(min(2, config.num_layers))
    hidden, vocab = config.hidden_dim, config.vocabulary_size

    reference_fc = {
        (r, name): quantize_channels(weights.projection(r, name)) for r in representatives for name in PROJECTIONS
    }
    reference_norm = {
        (r, name): np.float32(1.0) + template_post_norm(r, name, hidden) for r in representatives for name in POST_NORMS
    }
    final_norm_reference = np.float32(1.0) + template_final_norm(hidden)
    identified = {}  # template buffer -> candidate (representative, name) keys (shared across sites)

    def constant(subgraph, index):
        return index >= 0 and template.has_data(subgraph.tensors[index].buffer)

    def candidates(tensor, references, same):
        if tensor.buffer not in identified:
            identified[tensor.buffer] = [key for key, ref in references.items() if same(tensor, ref)]
        return identified[tensor.buffer]

    def same_fc(tensor, reference):
        if tensor.type != schema.TensorType.INT8 or tensor.quantization is None:
            return False
        return _agrees(template.array(tensor), np.asarray(tensor.quantization.scale, np.float32), reference)

    def same_norm(tensor, reference):
        return tensor.type == schema.TensorType.FLOAT32 and np.allclose(
            template.array(tensor).reshape(-1), reference, rtol=1e-6, atol=1e-7
        )

    # 1. Find each block's sites: (subgraph, op, input slot) -> (block, name).
    sites, logits_sites, lookup, scale_gathers = [], [], {}, []
    for s, subgraph in enumerate(model.subgraphs):
        counts = collections.Counter()

        def assign(keys, what):
            keys = [k for k in keys if config.num_layers == 1 or counts[k[1]] % 2 == k[0]]
            if not keys:
                raise RuntimeError(
                    f"LiteRT int8 export: a {what} in signature {subgraph.name!r} matches no block "
                    "weight; the converter changed how it lays out weights. Export with a smaller "
                    "model or an older converter, and report this."
                )
            r, name = min(keys, key=lambda k: counts[k[1]])
            block = counts[name]
            counts[name] += 1
            return block, name

        for o, op in enumerate(subgraph.operators):
            code = template.codes[op.opcodeIndex]
            inputs = [int(i) for i in op.inputs]
            if code == ops_enum.FULLY_CONNECTED and len(inputs) > 1 and not constant(subgraph, inputs[1]):
                # The tied projection: its weights are the lookup table's codes, gathered at
                # run time in the template (signatures._codes_at_run_time).
                if tuple(int(d) for d in subgraph.tensors[inputs[1]].shape) == (vocab, hidden):
                    logits_sites.append((s, o))
            elif code == ops_enum.FULLY_CONNECTED and len(inputs) > 1:
                keys = candidates(subgraph.tensors[inputs[1]], reference_fc, same_fc)
                block, name = assign(keys, "fully-connected weight")
                sites.append((s, o, 1, block, name))
            elif code == ops_enum.MUL:
                for slot, index in enumerate(inputs):
                    if constant(subgraph, index) and tuple(int(d) for d in subgraph.tensors[index].shape) == (hidden,):
                        if same_norm(subgraph.tensors[index], final_norm_reference):
                            sites.append((s, o, slot, None, "final_norm"))  # not folded: patch it
                            continue
                        keys = candidates(subgraph.tensors[index], reference_norm, same_norm)
                        block, name = assign(keys, "post-norm scale")
                        sites.append((s, o, slot, block, name))
            elif code == ops_enum.GATHER and constant(subgraph, inputs[0]):
                tensor = subgraph.tensors[inputs[0]]
                shape = tuple(int(d) for d in tensor.shape)
                if shape == (vocab, hidden) and tensor.type == schema.TensorType.INT8:
                    lookup["table"] = tensor.buffer
                elif shape == (vocab,):
                    scale_gathers.append((subgraph, op))
        # A prefill signature outputs only caches: the last block computes its query, keys and values
        # and the converter drops the rest of it (nothing reads its output).
        has_logits = any(site[0] == s for site in logits_sites)
        expected = {
            name: config.num_layers - int(not has_logits and name != "qkv")
            for name in (*PROJECTIONS, *POST_NORMS)
        }
        found = {name: counts[name] for name in expected}
        if counts and found != expected:
            raise RuntimeError(
                f"LiteRT int8 export: signature {subgraph.name!r} has weights for {found} blocks, "
                f"expected {expected}; the template did not convert as expected."
            )
    if logits_sites and ("table" not in lookup or not scale_gathers):
        raise RuntimeError("LiteRT int8 export: the template has no int8 token lookup table.")

    # 2. New buffers: one per (block, weight), shared by every signature.
    payloads = {}  # buffer index -> callable returning the bytes (computed while writing)
    scales = {}

    def new_buffer(producer, size):
        model.buffers.append(schema.BufferT())
        index = len(model.buffers) - 1
        payloads[index] = (producer, size)
        return index

    buffers = {}
    for _, _, _, block, name in sites:
        if (block, name) in buffers:
            continue
        if name in PROJECTIONS:
            if block in representatives and bits == 8:
                q, scale = reference_fc[(block, name)]
            else:
                q, scale = quantize_channels(weights.projection(block, name), bits)
            scales[(block, name)] = scale
            buffers[(block, name)] = new_buffer(
                lambda block=block, name=name: _stored(quantize_channels(weights.projection(block, name), bits)[0], bits),
                q.size if bits == 8 else (q.size + 1) // 2,
            )
            del q
        elif name == "final_norm":
            buffers[(block, name)] = new_buffer(weights.final_norm, hidden * 4)
        else:
            buffers[(block, name)] = new_buffer(
                lambda block=block, name=name: weights.post_norm(block, name), hidden * 4
            )

    def quantization(template_tensor, scale):
        params = copy.copy(template_tensor.quantization)
        params.scale = [float(x) for x in scale]
        params.zeroPoint = [0] * len(scale)
        params.quantizedDimension = 0
        return params

    new_tensors = {}
    for s, o, slot, block, name in sites:
        subgraph = model.subgraphs[s]
        op = subgraph.operators[o]
        key = (s, block, name)
        if key not in new_tensors:
            tensor = copy.copy(subgraph.tensors[int(op.inputs[slot])])
            tensor.buffer = buffers[(block, name)]
            tensor.name = (f"decoder_block_{block}/{name}" if block is not None else name).encode()
            if name in PROJECTIONS:
                tensor.quantization = quantization(tensor, scales[(block, name)])
                tensor.type = _tensor_type(schema, bits)
            subgraph.tensors.append(tensor)
            new_tensors[key] = len(subgraph.tensors) - 1
        op.inputs[slot] = new_tensors[key]

    row_scale, int4_table = None, None
    if (logits_sites or scale_gathers) and embedding_bits == 8:
        row_scale = weights.embedding_row_scales()
    elif logits_sites or scale_gathers:
        if "table" not in lookup:
            raise RuntimeError("LiteRT int4 export: the template has no int8 token lookup table.")
        int4_table, row_scale = weights.embedding_rows(embedding_bits)  # the 2B's: 295 MB
        payloads[lookup["table"]] = (lambda: int4_table, int4_table.size)

    # 3. The tied projection reads the lookup table itself (per-row scales); the ops that
    # computed its template weights at run time are dropped in step 4.
    for s, o in logits_sites:
        subgraph = model.subgraphs[s]
        fc = subgraph.operators[o]
        if _source_buffer(template, subgraph, int(fc.inputs[1])) != lookup["table"]:
            raise RuntimeError(
                "LiteRT int8 export: the template's tied projection does not read the int8 token "
                "table; the template did not convert as expected."
            )
        weight = copy.copy(subgraph.tensors[int(fc.inputs[1])])
        weight.buffer = lookup["table"]
        weight.type = _tensor_type(schema, embedding_bits)
        weight.name = f"token_embedding/int{embedding_bits}_table".encode()
        weight.quantization = schema.QuantizationParametersT()
        weight.quantization = quantization(weight, row_scale)
        subgraph.tensors.append(weight)
        fc.inputs[1] = len(subgraph.tensors) - 1

    # The converter quantizes the float row-scale table too (one int8 scale for all rows,
    # then a DEQUANTIZE): the lookup reads the exact float32 scales instead.
    if scale_gathers:
        scales_buffer = new_buffer(lambda: row_scale, vocab * 4)
        for subgraph, gather in scale_gathers:
            gather.inputs[0] = _add_float_constant(schema, subgraph, vocab, scales_buffer, b"token_embedding/row_scales")
            output = gather.outputs[0]
            if subgraph.tensors[output].type == schema.TensorType.FLOAT32:
                continue
            consumers = [op for op in subgraph.operators if output in op.inputs]
            if len(consumers) != 1 or template.codes[consumers[0].opcodeIndex] != ops_enum.DEQUANTIZE:
                raise RuntimeError("LiteRT int8 export: unexpected use of the quantized row scales.")
            gather.outputs[0] = consumers[0].outputs[0]
            subgraph.operators.remove(consumers[0])

    # 4. Drop the ops nothing reads any more; keep the template's data only where a tensor still reads it.
    for subgraph in model.subgraphs:
        _drop_unread_ops(subgraph)
    if int4_table is not None:
        _read_int4_table(template, lookup["table"])
    used = {0}
    for subgraph in model.subgraphs:
        referenced = set()
        for op in subgraph.operators:
            referenced.update(int(i) for i in op.inputs if i >= 0)
            referenced.update(int(i) for i in op.outputs)
        referenced.update(int(i) for i in subgraph.inputs)
        referenced.update(int(i) for i in subgraph.outputs)
        for index, tensor in enumerate(subgraph.tensors):
            if index in referenced:
                used.add(tensor.buffer)
            elif tensor.buffer not in payloads:  # a template tensor no op reads any more
                tensor.buffer = 0
    used.update(m.buffer for m in (model.metadata or []))
    for index, buffer in enumerate(model.buffers):
        if index in payloads:
            continue
        if index in used and template.has_data(index):
            if buffer.offset and buffer.offset > 1:
                # Read at the template's offset (write_flatbuffer rewrites buffer.offset).
                start, size = int(buffer.offset), int(buffer.size)
                payloads[index] = (lambda start=start, size=size: template.raw[start : start + size], size)
            continue
        if index not in used:
            model.buffers[index] = schema.BufferT()
    return write_flatbuffer(model, payloads, output_path, schema)


def _source_buffer(template, subgraph, index):
    """The constant buffer a run-time tensor is gathered or cast from (None if none)."""
    producers = {int(i): op for op in subgraph.operators for i in op.outputs}
    ops_enum = template.schema.BuiltinOperator
    while index in producers:
        op = producers[index]
        if template.codes[op.opcodeIndex] not in (ops_enum.CAST, ops_enum.GATHER, ops_enum.DEQUANTIZE):
            return None
        index = int(op.inputs[0])
        if template.has_data(subgraph.tensors[index].buffer):
            return subgraph.tensors[index].buffer
    return None


def _read_int4_table(template, table):
    """Each lookup GATHER of the token table reads it as INT4 (LiteRT's GATHER unpacks it)
    and gives INT4 rows, which only CASTs to float read."""
    schema, ops_enum = template.schema, template.schema.BuiltinOperator
    for subgraph in template.model.subgraphs:
        for op in subgraph.operators:
            if template.codes[op.opcodeIndex] != ops_enum.GATHER or subgraph.tensors[op.inputs[0]].buffer != table:
                continue
            readers = [other for other in subgraph.operators if op.outputs[0] in other.inputs]
            if not readers or any(template.codes[other.opcodeIndex] != ops_enum.CAST for other in readers):
                raise RuntimeError(
                    "LiteRT int4 export: the token lookup's rows are read by an op other than a CAST; "
                    "the template did not convert as expected."
                )
            subgraph.tensors[op.inputs[0]].type = schema.TensorType.INT4
            subgraph.tensors[op.outputs[0]].type = schema.TensorType.INT4


def _drop_unread_ops(subgraph):
    """Remove, until none is left, each op whose outputs no op and no signature output reads."""
    while True:
        read = {int(i) for op in subgraph.operators for i in op.inputs} | {int(i) for i in subgraph.outputs}
        kept = [op for op in subgraph.operators if any(int(i) in read for i in op.outputs)]
        if len(kept) == len(subgraph.operators):
            return
        subgraph.operators = kept


def _add_float_constant(schema, subgraph, length, buffer, name):
    """Append a float32 [length] tensor reading `buffer`; returns its index."""
    tensor = schema.TensorT()
    tensor.shape, tensor.type, tensor.buffer, tensor.name = [length], schema.TensorType.FLOAT32, buffer, name
    subgraph.tensors.append(tensor)
    return len(subgraph.tensors) - 1


def write_flatbuffer(model, payloads, path, schema):
    """Flatbuffer first, then every payload at a 64-byte-aligned offset (LiteRT's large-model layout)."""
    import flatbuffers

    order = sorted(payloads)
    for index in order:
        buffer = model.buffers[index]
        buffer.data = None
        buffer.size = int(payloads[index][1])
        buffer.offset = 1 << 62  # a placeholder of the same width as the final offsets

    def pack():
        builder = flatbuffers.Builder(1 << 20)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())

    head = pack()
    position = _aligned(len(head))
    for index in order:
        model.buffers[index].offset = position
        position = _aligned(position + model.buffers[index].size)
    packed = pack()
    if len(packed) != len(head):
        raise RuntimeError("LiteRT int8 export: the flatbuffer changed size when offsets were set.")
    with open(path, "wb") as f:
        f.write(packed)
        for index in order:
            producer, size = payloads[index]
            f.seek(model.buffers[index].offset)
            data = np.ascontiguousarray(producer())
            if data.nbytes != size:
                raise RuntimeError(f"LiteRT int8 export: buffer {index} has {data.nbytes} bytes, expected {size}.")
            f.write(data.tobytes())
            del data
        f.truncate(_aligned(f.tell()))
    return position


def _aligned(offset):
    return (offset + _ALIGNMENT - 1) // _ALIGNMENT * _ALIGNMENT
