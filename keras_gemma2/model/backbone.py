"""The Gemma 2 backbone: token ids and padding mask in, final hidden states out."""

import keras
import numpy as np

from keras_gemma2 import backend
from keras_gemma2.config import Gemma2Config
from keras_gemma2.model.layers import Gemma2DecoderBlock, RMSNorm, TiedEmbedding


def resolve_dtype_policy(dtype):
    """A Keras dtype policy from a name, a policy or None (the global policy)."""
    if dtype is None:
        return keras.config.dtype_policy()
    if isinstance(dtype, keras.dtype_policies.DTypePolicy):
        return dtype
    if isinstance(dtype, dict):  # a serialized policy, from get_config
        return keras.dtype_policies.deserialize(dtype)
    try:
        return keras.dtype_policies.get(dtype)
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"Unknown dtype {dtype!r}. Use one of 'float32', 'bfloat16', 'float16', "
            "'mixed_bfloat16', 'mixed_float16', or a keras.DTypePolicy."
        ) from error


def check_token_ids(values, vocabulary_size, name="token_ids"):
    """Raise ValueError naming `name` when a value of the numpy array lies outside [0, vocabulary_size)."""
    if values.size and (values.min() < 0 or values.max() >= vocabulary_size):
        bad = values[(values < 0) | (values >= vocabulary_size)]
        raise ValueError(
            f"Token ids must lie in [0, {vocabulary_size}); found {bad[:5].tolist()} in `{name}` "
            f"(the model's vocabulary has {vocabulary_size} tokens). Was the input tokenized "
            "with this model's tokenizer?"
        )


def standardize_inputs(inputs, config):
    """Fill a missing padding mask and check shapes and ids before any compute.

    Values are checked only when they are concrete (eager calls); inside a
    traced function only static shapes can be checked.
    """
    if not isinstance(inputs, dict):
        inputs = {"token_ids": inputs}
    unknown = sorted(set(inputs) - {"token_ids", "padding_mask"})
    if unknown or "token_ids" not in inputs:
        raise ValueError(
            f"Expected inputs {{'token_ids', 'padding_mask'}}, got keys {sorted(inputs)}."
        )
    token_ids = inputs["token_ids"]
    if isinstance(token_ids, (list, tuple, np.ndarray)):
        token_ids = np.asarray(token_ids)
        if token_ids.dtype.kind not in "iu":
            raise ValueError(
                f"`token_ids` must be integers, got dtype {token_ids.dtype}. "
                "Tokenize text first (Gemma2Tokenizer) or pass int arrays."
            )
        token_ids = token_ids.astype("int32")
    shape = tuple(token_ids.shape)
    if len(shape) == 1:
        raise ValueError(
            f"`token_ids` must have shape [batch, sequence], got {shape}. "
            "Add a batch axis, e.g. token_ids[None]."
        )
    if len(shape) != 2:
        raise ValueError(f"`token_ids` must have shape [batch, sequence], got {shape}.")
    length = shape[1]
    if length is not None and length > config.max_sequence_length:
        raise ValueError(
            f"Sequence length {length} exceeds the model's max_sequence_length "
            f"{config.max_sequence_length}. Truncate the input or split it into chunks."
        )
    if backend.is_concrete(token_ids):
        check_token_ids(np.asarray(keras.ops.convert_to_numpy(token_ids)), config.vocabulary_size)
    padding_mask = inputs.get("padding_mask")
    if padding_mask is None:
        padding_mask = keras.ops.ones(keras.ops.shape(token_ids), dtype="int32")
    else:
        if isinstance(padding_mask, (list, tuple, np.ndarray)):
            padding_mask = np.asarray(padding_mask).astype("int32")
        if tuple(padding_mask.shape) != shape:
            raise ValueError(
                f"`padding_mask` shape {tuple(padding_mask.shape)} must equal "
                f"`token_ids` shape {shape}."
            )
    if backend.is_concrete(token_ids):  # one tensor type for both inputs
        token_ids = keras.ops.convert_to_tensor(token_ids, "int32")
        padding_mask = keras.ops.convert_to_tensor(padding_mask, "int32")
    return {"token_ids": token_ids, "padding_mask": padding_mask}


@keras.saving.register_keras_serializable(package="keras_gemma2")
class Gemma2Backbone(keras.Model):
    """Decoder-only Gemma 2 transformer (functional Keras model).

    Inputs: `{"token_ids": int [batch, seq], "padding_mask": [batch, seq]}`
    (1 for real tokens; padding goes on the right). Output: the final
    RMS-normed hidden states [batch, seq, hidden_dim].
    """

    def __init__(self, config, dtype=None, **kwargs):
        if isinstance(config, dict):
            config = Gemma2Config.from_dict(config)
        if not isinstance(config, Gemma2Config):
            raise TypeError(f"`config` must be a Gemma2Config or dict, got {type(config).__name__}.")
        backend.check_backend()
        # `policy` goes to the layers. A DTypePolicyMap (a saved quantized model's
        # config) gives each quantized layer its own policy by path, so the layer
        # builds its quantized variables directly; the model itself keeps the default.
        policy = resolve_dtype_policy(dtype)
        model_policy = policy
        if isinstance(policy, keras.dtype_policies.DTypePolicyMap):
            model_policy = policy.default_policy

        # ---- layers ------------------------------------------------------
        token_embedding = TiedEmbedding(
            config.vocabulary_size,
            config.hidden_dim,
            config.final_logit_soft_cap,
            dtype=policy,
            name="token_embedding",
        )
        blocks = [
            Gemma2DecoderBlock(
                hidden_dim=config.hidden_dim,
                intermediate_dim=config.intermediate_dim,
                num_query_heads=config.num_query_heads,
                num_key_value_heads=config.num_key_value_heads,
                head_dim=config.head_dim,
                query_pre_attn_scalar=config.query_pre_attn_scalar,
                attention_logit_soft_cap=config.attention_logit_soft_cap,
                rope_max_wavelength=config.rope_max_wavelength,
                layer_norm_epsilon=config.layer_norm_epsilon,
                sliding_window_size=(
                    config.sliding_window_size if config.is_sliding(i) else None
                ),
                dtype=policy,
                name=f"decoder_block_{i}",
            )
            for i in range(config.num_layers)
        ]
        final_norm = RMSNorm(config.layer_norm_epsilon, dtype=policy, name="final_norm")

        # ---- functional graph -------------------------------------------
        token_ids = keras.Input(shape=(None,), dtype="int32", name="token_ids")
        padding_mask = keras.Input(shape=(None,), dtype="int32", name="padding_mask")
        x = token_embedding(token_ids)
        for block in blocks:
            x = block(x, padding_mask=padding_mask)
        hidden = final_norm(x)
        super().__init__(
            inputs={"token_ids": token_ids, "padding_mask": padding_mask},
            outputs=hidden,
            **kwargs,
        )
        self.dtype_policy = model_policy  # functional models ignore the `dtype` argument

        self.config = config
        self.token_embedding = token_embedding
        self.decoder_blocks = blocks
        self.final_norm = final_norm

    def __call__(self, inputs, *args, **kwargs):
        return super().__call__(standardize_inputs(inputs, self.config), *args, **kwargs)

    def get_config(self):
        return {
            "config": self.config.to_dict(),
            "dtype": keras.dtype_policies.serialize(self._config_policy()),
            "name": self.name,
        }

    def _config_policy(self):
        """The model's policy, or a DTypePolicyMap of it plus each quantized layer's policy."""
        from keras_gemma2.model.layers import own_policy

        quantized = {
            layer.path: own_policy(layer)
            for layer in self._flatten_layers(include_self=False)
            if layer.quantization_mode is not None
        }
        if not quantized:
            return self.dtype_policy
        return keras.dtype_policies.DTypePolicyMap(self.dtype_policy, quantized)

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    @classmethod
    def from_preset(cls, preset, dtype=None, **kwargs):
        """Load a backbone from a preset name, directory or handle (see `keras_gemma2.from_preset`)."""
        from keras_gemma2.checkpoints.presets import load_backbone

        return load_backbone(preset, dtype=dtype, **kwargs)
