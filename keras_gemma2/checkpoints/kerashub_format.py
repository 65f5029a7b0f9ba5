"""KerasHub Gemma 2 presets (as downloaded from Kaggle: keras/gemma2/keras/...).

A KerasHub preset directory holds `config.json` (a serialized
`keras_hub>GemmaBackbone`), `metadata.json`, the weights as one
`model.weights.h5` or as shards (`model.weights.json` + `model_NNNNN.weights.h5`),
and `assets/tokenizer/vocabulary.spm`.

Inside the h5 files Keras names each layer after its class in snake case
with a counter suffix in creation order: `layers/gemma_decoder_block` is
block 0, `layers/gemma_decoder_block_1` block 1, ..., `_10` block 10. Every
variable lives at `<layer>/vars/<index>`. We read the files with h5py alone
(no keras-hub import), one tensor per call, and hand back arrays in this
library's variable layout.
"""

import json
import os

import numpy as np

from keras_gemma2.checkpoints.download import repair_hint
from keras_gemma2.io.safetensors_files import CorruptFileError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.weights.h5"
SHARDED_WEIGHTS_INDEX = "model.weights.json"  # keras-hub SHARDED_MODEL_WEIGHTS_CONFIG_FILE

GEMMA_BACKBONE = "GemmaBackbone"
# keras-hub's GemmaBackbone has no position limit; Gemma 2 was trained to 8192.
MAX_SEQUENCE_LENGTH = 8192
ROPE_MAX_WAVELENGTH = 10000.0  # hard-coded in keras-hub's CachedGemmaAttention

_OTHER_BACKBONES = {
    "Gemma3Backbone": "Gemma 3 (different norms and attention)",
    "Gemma3nBackbone": "Gemma 3n",
    "RecurrentGemmaBackbone": "RecurrentGemma",
    "PaliGemmaBackbone": "PaliGemma",
    "LlamaBackbone": "Llama",
    "Llama3Backbone": "Llama 3",
    "MistralBackbone": "Mistral",
}


def _not_weights(path, error, what=""):
    """The error for an h5 file h5py cannot read: which file, what is wrong, the fix."""
    return CorruptFileError(
        f"{path} is not a valid KerasHub weights file{what} (truncated or corrupt: {error}). "
        + repair_hint(path)
    )


# ---- config ------------------------------------------------------------------
def config_from_kerashub(serialized, config_class, source=CONFIG_FILE):
    """A `config_class` (Gemma2Config) from a serialized keras-hub GemmaBackbone (config.json's dict).

    keras-hub's `intermediate_dim` is the width of both feed-forward branches
    together; ours is one branch. Its query scale is 1/sqrt(head_dim) with
    `query_head_dim_normalize` (2B, 9B) and 1/sqrt(hidden_dim // num_query_heads)
    without (27B).
    """
    if not isinstance(serialized, dict):
        raise ValueError(f"{source} does not hold a serialized KerasHub model (a JSON object).")
    class_name = serialized.get("class_name")
    registered = serialized.get("registered_name") or class_name
    if class_name != GEMMA_BACKBONE:
        what = _OTHER_BACKBONES.get(class_name, "not Gemma 2")
        raise ValueError(
            f"{source} describes a {registered!r} model ({what}); keras_gemma2 loads only "
            f"KerasHub '{GEMMA_BACKBONE}' presets of Gemma 2 (gemma2_2b_en, gemma2_9b_en, "
            "gemma2_27b_en and their instruct variants)."
        )
    fields = serialized.get("config")
    if not isinstance(fields, dict):
        raise ValueError(f"{source} has no 'config' object inside its GemmaBackbone entry.")

    required = (
        "vocabulary_size",
        "num_layers",
        "num_query_heads",
        "num_key_value_heads",
        "hidden_dim",
        "intermediate_dim",
        "head_dim",
    )
    missing = [name for name in required if fields.get(name) is None]
    if missing:
        raise ValueError(
            f"{source} lacks GemmaBackbone field(s) {missing}; the file is incomplete."
        )

    # Gemma 1 presets are GemmaBackbone too; keras-hub's defaults for the
    # Gemma 2 switches are the Gemma 1 behaviour, so a missing field counts as off.
    not_gemma2 = []
    for name in ("use_post_attention_norm", "use_post_ffw_norm", "use_sliding_window_attention"):
        if not fields.get(name, False):
            not_gemma2.append(f"`{name}` is {fields.get(name, 'missing')!r}")
    for name in ("attention_logit_soft_cap", "final_logit_soft_cap"):
        if fields.get(name) is None:
            not_gemma2.append(f"`{name}` is {'None' if name in fields else 'missing'}")
    if not_gemma2:
        raise ValueError(
            f"{source} is not a Gemma 2 preset (it looks like Gemma 1, e.g. gemma_2b_en): "
            + "; ".join(not_gemma2)
            + ". Gemma 2 presets set use_post_attention_norm, use_post_ffw_norm and "
            "use_sliding_window_attention to true and both soft caps. keras_gemma2 loads "
            "only Gemma 2; use keras_hub.models.GemmaCausalLM for Gemma 1."
        )

    _reject_quantized(fields.get("dtype"), source)

    intermediate = fields["intermediate_dim"]
    if not isinstance(intermediate, int) or intermediate % 2:
        raise ValueError(
            f"{source} has `intermediate_dim` {intermediate!r}; KerasHub stores the width of the "
            "two feed-forward branches together, so it must be an even integer."
        )
    hidden = fields["hidden_dim"]
    query_heads = fields["num_query_heads"]
    head_dim = fields["head_dim"]
    if fields.get("query_head_dim_normalize", True):
        query_pre_attn_scalar = head_dim
    else:
        query_pre_attn_scalar = hidden // query_heads
    try:
        return config_class.from_dict(dict(
            vocabulary_size=fields["vocabulary_size"],
            num_layers=fields["num_layers"],
            hidden_dim=hidden,
            intermediate_dim=intermediate // 2,
            num_query_heads=query_heads,
            num_key_value_heads=fields["num_key_value_heads"],
            head_dim=head_dim,
            query_pre_attn_scalar=query_pre_attn_scalar,
            sliding_window_size=fields.get("sliding_window_size", 4096),
            attention_logit_soft_cap=float(fields["attention_logit_soft_cap"]),
            final_logit_soft_cap=float(fields["final_logit_soft_cap"]),
            rope_max_wavelength=ROPE_MAX_WAVELENGTH,
            layer_norm_epsilon=fields.get("layer_norm_epsilon", 1e-6),
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        ))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{source}: {error}") from error


def _reject_quantized(dtype, source):
    """Quantized presets store extra scale variables we cannot map."""
    if isinstance(dtype, dict):
        policy_class = dtype.get("class_name", "DTypePolicy")
        name = str((dtype.get("config") or {}).get("name", ""))
    else:
        policy_class, name = "DTypePolicy", str(dtype or "")
    quantized = ("int8", "int4", "float8", "gptq", "awq")
    if "Map" in policy_class or "Quantiz" in policy_class or name.startswith(quantized):
        raise ValueError(
            f"{source} uses the dtype policy {policy_class} {name!r}: a quantized KerasHub preset. "
            "keras_gemma2 loads unquantized weights only; download the float/bfloat16 preset."
        )


# ---- weight files ----------------------------------------------------------------
def weight_files(directory):
    """The h5 files holding the weights, or a clear error naming what is missing."""
    single = os.path.join(directory, WEIGHTS_FILE)
    if os.path.isfile(single):
        return [single]
    index_path = os.path.join(directory, SHARDED_WEIGHTS_INDEX)
    if not os.path.isfile(index_path):
        raise FileNotFoundError(
            f"KerasHub preset {directory} has no weights: expected {WEIGHTS_FILE} or the sharded "
            f"{SHARDED_WEIGHTS_INDEX} with its model_NNNNN.weights.h5 files. "
            + repair_hint(single, missing=True)
        )
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        names = set()
        for value in weight_map.values():
            names.update(value if isinstance(value, list) else [value])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(
            f"{index_path} is not a valid Keras sharded-weights index (a JSON object with a "
            f"'weight_map'): {error}. " + repair_hint(index_path)
        ) from error
    paths = [os.path.join(directory, name) for name in sorted(names)]
    missing = [name for name, path in zip(sorted(names), paths) if not os.path.isfile(path)]
    if missing:
        raise FileNotFoundError(
            f"KerasHub preset {directory} is missing weight shard(s) {missing} listed in "
            f"{SHARDED_WEIGHTS_INDEX}. " + repair_hint(index_path, missing=True)
        )
    if not paths:
        raise ValueError(f"{index_path} lists no weight files. " + repair_hint(index_path))
    return paths


def _open(path):
    import h5py

    try:
        return h5py.File(path, "r")
    except OSError as error:
        raise _not_weights(path, error) from error


def index_datasets(paths):
    """{h5 dataset path: (file, shape)} over all files, reading metadata only."""
    import h5py

    found = {}
    for path in paths:
        with _open(path) as f:
            entries = {}

            def visit(name, item, entries=entries):
                if isinstance(item, h5py.Dataset):
                    entries[name] = tuple(item.shape)

            try:
                f.visititems(visit)
            except (OSError, RuntimeError, KeyError) as error:
                raise _not_weights(path, error) from error
        for name, shape in entries.items():
            found.setdefault(name, (path, shape))
    return found


# ---- layout ------------------------------------------------------------------------
def _block_prefix(index):
    # Keras' h5 naming: first instance unsuffixed, then _1, _2, ... in creation order.
    return "layers/gemma_decoder_block" + ("" if index == 0 else f"_{index}")


def _identity(array):
    return array


def _per_head_input_to_out_in(array):
    # keras-hub query/key/value (heads, hidden, head_dim) -> ours (heads * head_dim, hidden)
    heads, hidden, head_dim = array.shape
    return np.transpose(array, (0, 2, 1)).reshape(heads * head_dim, hidden)


def _per_head_output_to_out_in(array):
    # keras-hub attention output (heads, head_dim, hidden) -> ours (hidden, heads * head_dim)
    return array.reshape(-1, array.shape[-1]).T


def _in_out_to_out_in(array):
    # keras-hub Dense (in, out) -> ours (out, in)
    return array.T


def h5_layout(config):
    """[(our variable path, h5 dataset path, transform, expected h5 shape)]."""
    h, inter, d = config.hidden_dim, config.intermediate_dim, config.head_dim
    q, kv = config.num_query_heads, config.num_key_value_heads
    layout = [
        ("token_embedding/embeddings", "layers/reversible_embedding/vars/0", _identity,
         (config.vocabulary_size, h)),
    ]
    for i in range(config.num_layers):
        ours, theirs = f"decoder_block_{i}", _block_prefix(i)
        layout += [
            (f"{ours}/pre_attention_norm/scale", f"{theirs}/pre_attention_norm/vars/0",
             _identity, (h,)),
            (f"{ours}/attention/query/kernel", f"{theirs}/attention/query_dense/vars/0",
             _per_head_input_to_out_in, (q, h, d)),
            (f"{ours}/attention/key/kernel", f"{theirs}/attention/key_dense/vars/0",
             _per_head_input_to_out_in, (kv, h, d)),
            (f"{ours}/attention/value/kernel", f"{theirs}/attention/value_dense/vars/0",
             _per_head_input_to_out_in, (kv, h, d)),
            (f"{ours}/attention/attention_output/kernel", f"{theirs}/attention/output_dense/vars/0",
             _per_head_output_to_out_in, (q, d, h)),
            (f"{ours}/post_attention_norm/scale", f"{theirs}/post_attention_norm/vars/0",
             _identity, (h,)),
            (f"{ours}/pre_feedforward_norm/scale", f"{theirs}/pre_ffw_norm/vars/0",
             _identity, (h,)),
            # keras-hub: gelu(gating_ffw(x)) * gating_ffw_2(x), then ffw_linear.
            (f"{ours}/feedforward/gate/kernel", f"{theirs}/gating_ffw/vars/0",
             _in_out_to_out_in, (h, inter)),
            (f"{ours}/feedforward/up/kernel", f"{theirs}/gating_ffw_2/vars/0",
             _in_out_to_out_in, (h, inter)),
            (f"{ours}/feedforward/down/kernel", f"{theirs}/ffw_linear/vars/0",
             _in_out_to_out_in, (inter, h)),
            (f"{ours}/post_feedforward_norm/scale", f"{theirs}/post_ffw_norm/vars/0",
             _identity, (h,)),
        ]
    layout.append(("final_norm/scale", "layers/rms_normalization/vars/0", _identity, (h,)))
    return layout


def _count_blocks(datasets):
    base = "gemma_decoder_block"
    indices = set()
    for name in datasets:
        head = name.split("/")[1] if name.startswith("layers/") else ""
        suffix = head[len(base) + 1 :]
        if head == base:
            indices.add(0)
        elif head.startswith(base + "_") and suffix.isdigit():
            indices.add(int(suffix))
    return len(indices)


# ---- reading ---------------------------------------------------------------------
def _read_dataset(dataset, rows=None):
    array = dataset[()] if rows is None else dataset[rows[0] : rows[1]]
    if dataset.attrs.get("dtype") == "bfloat16" or (
        array.dtype.kind == "V" and array.dtype.itemsize == 2
    ):
        import ml_dtypes

        array = array.view(ml_dtypes.bfloat16)
    return np.asarray(array)


def _lazy(path, name, shape, transform):
    def read(rows=None):
        with _open(path) as f:
            try:
                return _read_dataset(f[name], rows)
            except (OSError, KeyError, RuntimeError) as error:
                raise _not_weights(path, error, f" (reading {name!r})") from error

    def load():
        return transform(read())

    if transform is _identity:  # rows of the stored tensor are rows of ours (the embedding table)
        load.read_rows = lambda start, stop: read((start, stop))
    load.source_name = name
    load.source_shape = shape
    load.source_file = path
    return load


def read_kerashub_preset(directory, config_class):
    """(config_class instance, {our variable path: zero-argument callable -> numpy array}).

    Everything is checked before any tensor is read: the config is Gemma 2,
    the weight files exist and open, every tensor is present with the shape
    the config implies. Each callable then reads one tensor from disk.
    """
    directory = os.fspath(directory)
    config_path = os.path.join(directory, CONFIG_FILE)
    try:
        with open(config_path, encoding="utf-8") as f:
            serialized = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"KerasHub preset {directory} has no {CONFIG_FILE}.") from None
    except ValueError as error:
        raise ValueError(f"{config_path} is not valid JSON: {error}.") from error
    config = config_from_kerashub(serialized, config_class, config_path)

    files = weight_files(directory)
    datasets = index_datasets(files)
    where = files[0] if len(files) == 1 else os.path.join(directory, SHARDED_WEIGHTS_INDEX)

    blocks = _count_blocks(datasets)
    if blocks != config.num_layers:
        raise ValueError(
            f"{where} holds {blocks} decoder blocks but {config_path} says num_layers="
            f"{config.num_layers}. The weights and config.json come from different presets."
        )
    layout = h5_layout(config)
    missing = [name for _, name, _, _ in layout if name not in datasets]
    if missing:
        raise ValueError(
            f"{where} lacks {len(missing)} weight(s) a Gemma 2 GemmaBackbone needs, e.g. "
            f"{missing[:3]}. The file is not a complete GemmaBackbone checkpoint. "
            + repair_hint(where)
        )
    tensors = {}
    for ours, name, transform, expected in layout:
        path, shape = datasets[name]
        if shape != expected:
            raise ValueError(
                f"Weight {name!r} in {path} has shape {shape}, but {config_path} implies "
                f"{expected}. The weights and config.json do not match."
            )
        tensors[ours] = _lazy(path, name, shape, transform)
    return config, tensors
