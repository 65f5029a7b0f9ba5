"""Gemma 2 language model: the backbone plus the tied, soft-capped output projection."""

import keras
import numpy as np

from keras_gemma2.backbone import Gemma2Backbone, standardize_inputs


@keras.saving.register_keras_serializable(package="keras_gemma2")
class Gemma2CausalLM(keras.Model):
    """`model({"token_ids", "padding_mask"})` -> float32 logits after the final soft-cap.

    Training: `model.compile()` picks AdamW and next-token cross-entropy;
    `model.fit(x)` with `x` a dict of token ids and padding mask (no labels)
    trains on predicting token t+1 from tokens <= t, padding ignored.
    Explicit labels (`fit(x, y)`) are used as given.
    """

    def __init__(self, backbone, tokenizer=None, **kwargs):
        if not isinstance(backbone, Gemma2Backbone):
            raise TypeError(f"`backbone` must be a Gemma2Backbone, got {type(backbone).__name__}.")
        inputs = backbone.input
        hidden = backbone(inputs)
        logits = backbone.token_embedding(hidden, reverse=True)
        super().__init__(inputs=inputs, outputs=logits, **kwargs)
        self.dtype_policy = backbone.dtype_policy
        self.backbone = backbone
        self.tokenizer = tokenizer

    @property
    def config(self):
        return self.backbone.config

    def __call__(self, inputs, *args, **kwargs):
        return super().__call__(standardize_inputs(inputs, self.config), *args, **kwargs)

    # ---- training defaults ---------------------------------------------
    def compile(self, optimizer="auto", loss="auto", weighted_metrics="auto", **kwargs):
        if optimizer == "auto":
            optimizer = keras.optimizers.AdamW(learning_rate=5e-5, weight_decay=0.01)
        if loss == "auto":
            # Mean over real (non-padding) tokens, not over all positions.
            loss = keras.losses.SparseCategoricalCrossentropy(
                from_logits=True, reduction="mean_with_sample_weight"
            )
        if weighted_metrics == "auto":
            weighted_metrics = [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
        super().compile(optimizer=optimizer, loss=loss, weighted_metrics=weighted_metrics, **kwargs)

    @staticmethod
    def _next_token_targets(x, y, y_pred, sample_weight):
        """Without labels, predict token t+1 at position t; padding gets weight 0."""
        if y is not None or not isinstance(x, dict):
            return y, y_pred, sample_weight
        y = x["token_ids"][:, 1:]
        weight = keras.ops.cast(x["padding_mask"][:, 1:], "float32")
        if sample_weight is not None:
            weight = weight * keras.ops.cast(sample_weight, "float32")[:, 1:]
        return y, y_pred[:, :-1], weight

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        y, y_pred, sample_weight = self._next_token_targets(x, y, y_pred, sample_weight)
        return super().compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training
        )

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        y, y_pred, sample_weight = self._next_token_targets(x, y, y_pred, sample_weight)
        return super().compute_metrics(x, y, y_pred, sample_weight)

    # ---- scoring --------------------------------------------------------
    def score(self, token_ids, padding_mask=None):
        """Log-probability of each token given the ones before it.

        `token_ids`: int [batch, seq] (or a string / list of strings when a
        tokenizer is attached; BOS is prepended). Returns float32
        [batch, seq - 1]: entry t is log P(token t+1 | tokens <= t), 0 where
        token t+1 is padding. For strings, a list of 1-D arrays, one per text.
        """
        texts = None
        if isinstance(token_ids, str) or (
            isinstance(token_ids, (list, tuple)) and token_ids and isinstance(token_ids[0], str)
        ):
            if self.tokenizer is None:
                raise ValueError("Scoring text needs a tokenizer: pass token ids or attach one.")
            texts = [token_ids] if isinstance(token_ids, str) else list(token_ids)
            encoded = self.tokenizer(texts)
            length = max(len(ids) for ids in encoded)
            token_ids = np.zeros((len(encoded), length), "int32")
            padding_mask = np.zeros_like(token_ids)
            for row, ids in enumerate(encoded):
                token_ids[row, : len(ids)] = ids
                padding_mask[row, : len(ids)] = 1
        inputs = standardize_inputs({"token_ids": token_ids, "padding_mask": padding_mask}, self.config)
        logits = np.asarray(self.predict_on_batch(inputs), dtype="float32")
        ids = np.asarray(keras.ops.convert_to_numpy(inputs["token_ids"]))
        mask = np.asarray(keras.ops.convert_to_numpy(inputs["padding_mask"])).astype(bool)
        logits = logits[:, :-1]
        shifted = logits - logits.max(axis=-1, keepdims=True)
        log_norm = np.log(np.exp(shifted).sum(axis=-1))
        chosen = np.take_along_axis(shifted, ids[:, 1:, None], axis=-1)[..., 0]
        logprobs = np.where(mask[:, 1:], chosen - log_norm, 0.0).astype("float32")
        if texts is None:
            return logprobs
        return [logprobs[row, : mask[row].sum() - 1] for row in range(len(texts))]

    # ---- presets --------------------------------------------------------
    @classmethod
    def from_preset(cls, preset, dtype=None, **kwargs):
        """Load model and tokenizer from a preset name, directory or handle."""
        from keras_gemma2.checkpoints import load_causal_lm

        return load_causal_lm(preset, dtype=dtype, **kwargs)

    def save_to_preset(self, preset_dir, max_shard_size="4GB"):
        from keras_gemma2.checkpoints import save_preset

        save_preset(self.backbone, preset_dir, tokenizer=self.tokenizer, max_shard_size=max_shard_size)

    def get_config(self):
        return {
            "backbone": keras.saving.serialize_keras_object(self.backbone),
            "name": self.name,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"])
        return cls(**config)
