"""Hugging Face transformers Gemma 2 checkpoints: config and weight layout.

The same layout is this library's own save format, so a directory written by
`save_to_preset` also loads in transformers' `Gemma2ForCausalLM`.
"""

import json
import os

HF_MODEL_TYPE = "gemma2"
OTHER_MODEL_TYPES_HINT = {
    "gemma": "Gemma 1 (no soft-caps, no sliding window)",
    "gemma3": "Gemma 3 (different norms and attention)",
    "gemma3_text": "Gemma 3 (different norms and attention)",
    "recurrent_gemma": "RecurrentGemma",
    "llama": "Llama",
}
REQUIRED_HF_FIELDS = (
    "vocab_size", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
)


def config_from_hf(hf_config, config_class, source="config.json"):
    """A `config_class` (Gemma2Config) from a transformers Gemma2Config dict."""
    model_type = hf_config.get("model_type")
    if model_type != HF_MODEL_TYPE:
        what = OTHER_MODEL_TYPES_HINT.get(model_type, "not Gemma 2")
        raise ValueError(
            f"{source} has model_type {model_type!r} ({what}); keras_gemma2 loads only "
            f"model_type 'gemma2' checkpoints (google/gemma-2-2b, -9b, -27b and their -it)."
        )
    activation = hf_config.get("hidden_activation") or hf_config.get("hidden_act")
    if activation not in (None, "gelu_pytorch_tanh", "gelu_tanh"):
        raise ValueError(
            f"{source} uses activation {activation!r}; Gemma 2 uses tanh-approximated gelu "
            "('gelu_pytorch_tanh')."
        )
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if key in hf_config and hf_config[key] is None:
            raise ValueError(f"{source} disables {key}; Gemma 2 always soft-caps.")
    missing = [key for key in REQUIRED_HF_FIELDS if hf_config.get(key) is None]
    if missing:
        raise ValueError(
            f"{source} lacks field(s) {missing} that a transformers Gemma 2 config needs; the "
            "file is incomplete. Restore it from the checkpoint's source."
        )
    hidden = hf_config["hidden_size"]
    heads = hf_config["num_attention_heads"]
    try:  # a wrong type (e.g. a string) would otherwise fail inside Gemma2Config or below
        head_dim = hf_config.get("head_dim") or hidden // heads
        return config_class.from_dict(dict(
            vocabulary_size=hf_config["vocab_size"],
            num_layers=hf_config["num_hidden_layers"],
            hidden_dim=hidden,
            intermediate_dim=hf_config["intermediate_size"],
            num_query_heads=heads,
            num_key_value_heads=hf_config.get("num_key_value_heads", heads),
            head_dim=head_dim,
            query_pre_attn_scalar=hf_config.get("query_pre_attn_scalar", head_dim),
            sliding_window_size=hf_config.get("sliding_window") or 4096,
            attention_logit_soft_cap=hf_config.get("attn_logit_softcapping", 50.0),
            final_logit_soft_cap=hf_config.get("final_logit_softcapping", 30.0),
            rope_max_wavelength=hf_config.get("rope_theta", 10000.0),
            layer_norm_epsilon=hf_config.get("rms_norm_eps", 1e-6),
            max_sequence_length=hf_config.get("max_position_embeddings", 8192),
        ))
    except (TypeError, ValueError, ZeroDivisionError) as error:
        raise ValueError(f"{source}: {error}") from error


def config_to_hf(config, torch_dtype="float32", special_ids=None):
    """A transformers-readable config.json dict for `config`."""
    special_ids = special_ids or {}
    return {
        "architectures": ["Gemma2ForCausalLM"],
        "model_type": HF_MODEL_TYPE,
        "vocab_size": config.vocabulary_size,
        "num_hidden_layers": config.num_layers,
        "hidden_size": config.hidden_dim,
        "intermediate_size": config.intermediate_dim,
        "num_attention_heads": config.num_query_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "query_pre_attn_scalar": config.query_pre_attn_scalar,
        "sliding_window": config.sliding_window_size,
        "attn_logit_softcapping": config.attention_logit_soft_cap,
        "final_logit_softcapping": config.final_logit_soft_cap,
        "rope_theta": config.rope_max_wavelength,
        "rms_norm_eps": config.layer_norm_epsilon,
        "max_position_embeddings": config.max_sequence_length,
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_act": "gelu_pytorch_tanh",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": True,
        "cache_implementation": "hybrid",
        "pad_token_id": special_ids.get("pad", 0),
        "eos_token_id": special_ids.get("eos", 1),
        "bos_token_id": special_ids.get("bos", 2),
        "torch_dtype": torch_dtype,
    }


def tensor_names(config):
    """[(keras variable path, hf tensor name)] for every weight.

    The arrays are the same in both: projections are (out_features,
    in_features), heads flattened into the output (query, key, value) or
    input (attention output) width.
    """
    layout = [("token_embedding/embeddings", "model.embed_tokens.weight")]
    for i in range(config.num_layers):
        k, h = f"decoder_block_{i}/", f"model.layers.{i}."
        layout += [
            (k + "pre_attention_norm/scale", h + "input_layernorm.weight"),
            (k + "attention/query/kernel", h + "self_attn.q_proj.weight"),
            (k + "attention/key/kernel", h + "self_attn.k_proj.weight"),
            (k + "attention/value/kernel", h + "self_attn.v_proj.weight"),
            (k + "attention/attention_output/kernel", h + "self_attn.o_proj.weight"),
            (k + "post_attention_norm/scale", h + "post_attention_layernorm.weight"),
            (k + "pre_feedforward_norm/scale", h + "pre_feedforward_layernorm.weight"),
            (k + "feedforward/gate/kernel", h + "mlp.gate_proj.weight"),
            (k + "feedforward/up/kernel", h + "mlp.up_proj.weight"),
            (k + "feedforward/down/kernel", h + "mlp.down_proj.weight"),
            (k + "post_feedforward_norm/scale", h + "post_feedforward_layernorm.weight"),
        ]
    layout.append(("final_norm/scale", "model.norm.weight"))
    return layout


def read_hf_config(directory):
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}.") from error
