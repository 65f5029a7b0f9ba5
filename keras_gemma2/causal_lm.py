"""Gemma 2 language model: the backbone plus the tied, soft-capped output projection."""

import dataclasses
import functools
import os
import warnings

import keras
import numpy as np

from keras_gemma2 import backend
from keras_gemma2.checkpoints import presets
from keras_gemma2.generation import results, speculative
from keras_gemma2.generation.conversation import Conversation
from keras_gemma2.generation.generator import Generator
from keras_gemma2.generation.request import build_request, check_output_options, default_stop_ids
from keras_gemma2.generation.samplers import Sampler, compiled_sampler, get_sampler
from keras_gemma2.model import kv_cache, lora, quantization
from keras_gemma2.model.backbone import Gemma2Backbone, standardize_inputs
from keras_gemma2.tokenizer import Gemma2Tokenizer, check_text
from keras_gemma2.training import batch_checks, text_dataset
from keras_gemma2.training.batch_checks import CheckedTraining
from keras_gemma2.training.preprocessor import DEFAULT_SEQUENCE_LENGTH, Gemma2CausalLMPreprocessor, text_kind


@keras.saving.register_keras_serializable(package="keras_gemma2")
class Gemma2CausalLM(CheckedTraining, keras.Model):
    """`model({"token_ids", "padding_mask"})` -> float32 logits after the final soft-cap.

    Training: `model.compile()` picks AdamW and next-token cross-entropy;
    `model.fit(x)` with `x` a dict of token ids and padding mask (no labels)
    trains on predicting token t+1 from tokens <= t, padding ignored.
    Explicit labels (`fit(x, y)`) are used as given.
    """

    def __new__(cls, *args, **kwargs):
        model = super().__new__(cls, *args, **kwargs)
        # Keras wraps `quantize` on each instance with its own checks, whose messages
        # name modes this model does not support; ours run first.
        keras_quantize = model.quantize

        @functools.wraps(cls.quantize)
        def quantize(mode=None, config=None, filters=None, **kwargs):
            mode = quantization.check_request(model, mode, config)
            return keras_quantize(mode, config=config, filters=filters, **kwargs)

        model.quantize = quantize
        return model

    def __init__(self, backbone, tokenizer=None, **kwargs):
        if not isinstance(backbone, Gemma2Backbone):
            raise TypeError(f"`backbone` must be a Gemma2Backbone, got {type(backbone).__name__}.")
        inputs = backbone.input
        hidden = backbone(inputs)
        super().__init__(inputs=inputs, outputs=backbone.logits(hidden), **kwargs)
        self.dtype_policy = backbone.dtype_policy
        self.backbone = backbone
        self.tokenizer = tokenizer

    @property
    def config(self):
        return self.backbone.config

    def __call__(self, inputs, *args, **kwargs):
        return super().__call__(standardize_inputs(inputs, self.config), *args, **kwargs)

    # ---- training defaults ---------------------------------------------
    def compile(self, optimizer="auto", loss="auto", weighted_metrics="auto", sampler=None, **kwargs):
        """Keras' compile with this model's training defaults ("auto").

        `sampler`: generate's default from now on, as in keras-hub: a name ("greedy",
        "top_k", "top_p", "min_p", "temperature", "beam"; keras-hub's "random"), a
        keras_gemma2.Sampler, or a keras-hub sampler object (its seed becomes
        generate's default seed). generate(sampler=...) still overrides it per call.
        """
        if sampler is not None:
            self._compiled_sampler = compiled_sampler(sampler)  # checked before anything compiles
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

    # ---- text in fit / evaluate / predict ---------------------------------
    @property
    def preprocessor(self):
        """Text -> training batches (keras-hub's `model.preprocessor`; set its sequence_length)."""
        if getattr(self, "_preprocessor", None) is None:
            if self.tokenizer is None:
                raise ValueError("This model has no tokenizer, so no preprocessor: load a preset that has one.")
            context = self.config.max_sequence_length
            self._preprocessor = Gemma2CausalLMPreprocessor(
                self.tokenizer, sequence_length=min(DEFAULT_SEQUENCE_LENGTH, context),
                max_sequence_length=context,
            )
        return self._preprocessor

    @preprocessor.setter
    def preprocessor(self, value):
        if not isinstance(value, Gemma2CausalLMPreprocessor):
            raise TypeError(f"preprocessor must be a Gemma2CausalLMPreprocessor, got {type(value).__name__}.")
        self._preprocessor = value

    def _from_text(self, x, y, kwargs):
        """Text (strings, chat pairs, conversations, or a tf.data.Dataset of them) -> the model's batches."""
        if batch_checks.is_tf_dataset(x):
            mapped = text_dataset.mapped(x, lambda: self.preprocessor)
            return (x, y, kwargs) if mapped is None else (mapped, y, kwargs)
        kind, _ = text_kind(x)
        if kind is None:
            return x, y, kwargs
        if y is not None or kwargs.get("sample_weight") is not None:
            raise ValueError(
                "Text inputs carry their own labels (the next tokens) and weights; pass only x, "
                "or tokenize yourself and pass {'token_ids', 'padding_mask'} with labels."
            )
        inputs, labels, weights = self.preprocessor(x)
        return inputs, labels, {**kwargs, "sample_weight": weights}

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
            for row, text in enumerate(texts):
                what = "The text" if len(texts) == 1 else f"Text {row}"
                if not isinstance(text, str):
                    raise ValueError(f"{what} is a {type(text).__name__}; pass all strings or all token ids.")
                if not text:
                    raise ValueError(
                        f"{what} to score is empty: there is no token to score (perplexity would "
                        "be meaningless). Pass non-empty text."
                    )
                check_text(text, what)
            encoded = self.tokenizer(texts)
            short = [row for row, ids in enumerate(encoded) if len(ids) < 2]
            if short:
                raise ValueError(
                    f"Text {short[0]} ({texts[short[0]]!r}) has {len(encoded[short[0]])} token(s); "
                    "scoring needs at least 2 (each token is scored given the ones before it). "
                    "Attach a tokenizer with add_bos=True or pass longer text."
                )
            length = max(len(ids) for ids in encoded)
            token_ids = np.zeros((len(encoded), length), "int32")
            padding_mask = np.zeros_like(token_ids)
            for row, ids in enumerate(encoded):
                token_ids[row, : len(ids)] = ids
                padding_mask[row, : len(ids)] = 1
        elif isinstance(token_ids, (list, tuple)) and not token_ids:
            raise ValueError(
                "score got an empty list as token_ids: pass a text, a list of texts or token ids "
                "of shape [batch, sequence]."
            )
        inputs = standardize_inputs({"token_ids": token_ids, "padding_mask": padding_mask}, self.config)
        shape = tuple(inputs["token_ids"].shape)
        if shape[0] == 0 or shape[1] < 2:
            raise ValueError(
                f"score needs token_ids with at least one row of at least 2 tokens (each token is "
                f"scored given the ones before it), got shape {shape}."
            )
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

    # ---- generation -------------------------------------------------------
    @property
    def generator(self):
        """The compiled generation functions (created on first use).

        Rebuilt when LoRA adapters were added since (they capture the variables),
        also when that went through `model.backbone.enable_lora`, and when
        `jit_compile` turns PyTorch's torch.compile of the decode step on or off.
        """
        built_for = getattr(self, "_generator_built_for", None)
        now = (self.backbone.lora_targets, backend.torch_compiles(self))
        if getattr(self, "_generator", None) is None or built_for != now:
            self._generator = Generator(self)
            self._generator_built_for = now
        return self._generator

    def generate(
        self,
        inputs,
        max_length=None,
        max_new_tokens=None,
        sampler=None,
        stop_token_ids="auto",
        stop_strings=None,
        seed=None,
        return_logprobs=False,
        stream=False,
        temperature=None,
        top_k=None,
        top_p=None,
        min_p=None,
        sliding_window_size=None,
        draft_model=None,
        num_draft_tokens=None,
    ):
        """Continue prompts: strings (tokenized with BOS) or token ids, one or a batch.

        Returns the new text (str or list of str) for string inputs, a list of
        int arrays for token-id inputs; with `return_logprobs`, a `GenerationResult`
        holding tokens, their log-probabilities and text. Rows stop at their
        first stop token (default: `default_stop_token_ids()`) or stop string.
        `stream=True` returns an iterator of text pieces as tokens arrive (one
        prompt); `stream=callable` calls it with each piece and returns the
        result. `max_length` counts the longest prompt plus new tokens.
        `sliding_window_size` overrides the window at inference time. `sampler`
        defaults to the one given to `compile(sampler=...)`, else "greedy".
        `draft_model` (a smaller Gemma2CausalLM with the same vocabulary, e.g. a
        distilled student): speculative decoding, `num_draft_tokens` (default 4)
        proposed per pass of this model; greedy output is identical, sampled
        output has this model's distribution (`generator.last_speculation`
        holds the acceptance counts).
        """
        # Everything is checked before anything compiles.
        request = build_request(
            self.config, self.tokenizer, inputs, max_length, max_new_tokens, stop_token_ids,
            stop_strings, stream, sliding_window_size,
        )
        sampler, seed = self._sampler_and_seed(sampler, seed, temperature, top_k, top_p, min_p)
        beam = not isinstance(sampler, Sampler)
        check_output_options(seed, return_logprobs, stream, beam=beam)
        num_draft_tokens = speculative.check_draft(self, draft_model, num_draft_tokens, beam)
        if draft_model is not None:
            speculative.check_room(draft_model, max(map(len, request.prompts)), request.max_new_tokens,
                                   num_draft_tokens)
            request = dataclasses.replace(request, draft=draft_model, num_draft_tokens=num_draft_tokens)
        return results.generate(self, request, sampler, seed, return_logprobs, stream)

    def _sampler_and_seed(self, sampler, seed, temperature, top_k, top_p, min_p):
        """The Sampler (or BeamSearch) and seed of a request: compile(sampler=...)'s when none is given."""
        if sampler is None:
            sampler, compiled_seed = getattr(self, "_compiled_sampler", ("greedy", None))
            seed = compiled_seed if seed is None else seed
        return get_sampler(sampler, temperature, top_k, top_p, min_p), seed

    def default_stop_token_ids(self):
        """The token ids that end a generated row by default: <eos> and <end_of_turn>.

        Looked up in the attached tokenizer; without one, Gemma's ids (1 and 107)
        that lie inside the vocabulary. A list of ints.
        """
        return default_stop_ids(self.tokenizer, self.config.vocabulary_size)

    def kv_cache_bytes(self, batch_size, max_length, sliding_window_size=None):
        """Bytes of the generation cache (compute dtype; sliding layers hold only their window)."""
        config = self.config
        if sliding_window_size is not None:
            config = config.replace(sliding_window_size=sliding_window_size)
        return kv_cache.CacheLayout.rings(config, max_length).bytes(
            config, batch_size, self.backbone.compute_dtype
        )

    def chat(self, messages, **generate_kwargs):
        """The model's next turn for a conversation ([{"role", "content"}, ...])."""
        if self.tokenizer is None:
            raise ValueError("chat() needs a tokenizer: load a preset that has one.")
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.generate(prompt, **generate_kwargs)

    def start_chat(
        self,
        messages=None,
        *,
        max_new_tokens=None,
        sampler=None,
        seed=None,
        stop_token_ids="auto",
        stop_strings=None,
        temperature=None,
        top_k=None,
        top_p=None,
        min_p=None,
        sliding_window_size=None,
        on_overflow="error",
        draft_model=None,
        num_draft_tokens=None,
    ):
        """A `Conversation` that keeps its KV cache between turns: `conversation.send("Hi")`.

        Each turn prefills only its new message; the model's previous reply is
        already in the cache. `messages`: earlier turns (a system message is
        merged into the first user turn, as in `chat`). The other settings are
        generate's, for every turn (`max_new_tokens` per reply, default 256;
        `send(max_new_tokens=)` changes one turn's). `on_overflow`: "error"
        refuses a turn that would outgrow the context, "drop_oldest" drops the
        oldest turns to make room (then prefills what is left once).
        """
        if draft_model is not None or num_draft_tokens is not None:
            raise ValueError(
                "Conversations do not decode speculatively: their cache holds one model's keys. Drop "
                "draft_model / num_draft_tokens, or use model.generate(..., draft_model=...) per prompt."
            )
        sampler, seed = self._sampler_and_seed(sampler, seed, temperature, top_k, top_p, min_p)
        return Conversation(
            self, messages, max_new_tokens, sampler, seed, stop_token_ids, stop_strings,
            sliding_window_size, on_overflow,
        )

    # ---- LoRA -------------------------------------------------------------
    def enable_lora(self, rank, target_layers=("query", "value"), alpha=None):
        """Freeze the model; add trainable rank-`rank` adapters to each block's projections.

        `target_layers`: any of query, key, value, attention_output, gate, up, down.
        """
        lora.enable_lora(self, rank, target_layers, alpha)

    def save_lora_weights(self, path):
        lora.save_lora_weights(self, path)

    def load_lora_weights(self, path):
        lora.load_lora_weights(self, path)

    def merge_lora(self):
        """A new model with the adapters folded into the kernels."""
        return lora.merge_lora(self)

    # ---- quantization -------------------------------------------------------
    def quantize(self, mode=None, config=None, filters=None, **kwargs):
        """Quantize the weights in place: "int8" or "int4". Returns nothing, like Keras.

        The attention and feed-forward projections use Keras' own quantization
        (int4: Keras' default sub-channel blocks of 128; pass a
        `keras.quantizers.Int4QuantizationConfig` as `config` to change that);
        the tied embedding keeps one symmetric scale per vocabulary row, shared by
        the token lookup and the output projection; norm scales stay float.
        `filters` (a regex searched in each layer's path, a list of them, or a
        callable) narrows the layers. Invalid requests fail before any work.
        Save a quantized model with `model.save("m.keras")`.
        """
        mode = quantization.check_request(self, mode, config)  # cheap; also for Gemma2CausalLM.quantize(model, ...)
        select = quantization.layer_filter(filters)
        with warnings.catch_warnings(), quantization.collecting_new_objects_only():
            # Keras' own quantizers convert variables with np.array (a numpy 2 notice).
            warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
            super().quantize(mode, config=config, filters=select, **kwargs)
        self._generator = None  # compiled generation functions captured the float variables

    def weight_bytes(self):
        """Bytes held by the model's variables (e.g. before and after `quantize`)."""
        return quantization.weight_bytes(self)

    # ---- presets --------------------------------------------------------
    @classmethod
    def from_preset(cls, preset, dtype=None, load_weights=True, quantize=None, **config_overrides):
        """Load model and tokenizer from a preset name, directory or handle (see `keras_gemma2.from_preset`)."""
        backbone, tokenizer_file = Gemma2Backbone._from_preset(preset, dtype, load_weights, config_overrides, quantize)
        tokenizer = Gemma2Tokenizer(tokenizer_file) if tokenizer_file else None
        return cls(backbone, tokenizer=tokenizer)

    def save_to_preset(self, preset_dir, max_shard_size="4GB"):
        """Write a transformers-format preset (plus keras_gemma2.json) of this float model."""
        quantized = quantization.quantization_modes(self.backbone)
        if quantized:
            raise ValueError(
                f"This model is quantized in Keras ({', '.join(quantized)}); a preset holds float "
                "(transformers-format) weights. Save it with model.save('model.keras') and load "
                "that with keras.saving.load_model, or save the float model to a preset and "
                "quantize after loading."
            )
        if lora.lora_layers(self):
            raise ValueError(
                "This model has unmerged LoRA adapters, which a preset does not hold: saving would "
                "write only the base weights. Call `model = model.merge_lora()` and save that, or "
                "keep the adapters beside the preset with `model.save_lora_weights('adapters.safetensors')`."
            )
        presets.save_preset(
            preset_dir, self.config, {v.path: v for v in self.backbone.weights},
            self.backbone.dtype_policy, tokenizer=self.tokenizer, max_shard_size=max_shard_size,
        )

    def get_config(self):
        config = {
            "backbone": keras.saving.serialize_keras_object(self.backbone),
            "name": self.name,
        }
        if self.tokenizer is not None:  # the vocabulary itself is an asset (save_assets)
            config["tokenizer"] = {"add_bos": self.tokenizer.add_bos, "add_eos": self.tokenizer.add_eos}
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"])
        tokenizer_options = config.pop("tokenizer", None)
        model = cls(**config)
        model._tokenizer_options = tokenizer_options  # read by load_assets
        return model

    # `model.save("m.keras")` / `keras.saving.load_model`: the tokenizer travels as an asset.
    def save_assets(self, dir_path):
        if self.tokenizer is not None:
            self.tokenizer.save_assets(dir_path)

    def load_assets(self, dir_path):
        options = getattr(self, "_tokenizer_options", None)
        path = os.path.join(dir_path, "tokenizer.model")
        if options is not None and os.path.exists(path):
            self.tokenizer = Gemma2Tokenizer(path, **options)

