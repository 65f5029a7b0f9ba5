"""Gemma 2 language model: the backbone plus the tied, soft-capped output projection."""

import functools
import warnings

import keras
import numpy as np

from keras_gemma2.model.backbone import Gemma2Backbone, standardize_inputs
from keras_gemma2.training.batch_checks import CheckedTraining
from keras_gemma2.generation.samplers import is_integer
from keras_gemma2.tokenizer import check_text


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
            from keras_gemma2.model import quantization

            mode = quantization.check_request(model, mode, config)
            return keras_quantize(mode, config=config, filters=filters, **kwargs)

        model.quantize = quantize
        return model

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
        """The compiled generation functions (created on first use)."""
        if getattr(self, "_generator", None) is None:
            from keras_gemma2.generation.generator import Generator

            self._generator = Generator(self)
        return self._generator

    def generate(
        self,
        inputs,
        max_length=None,
        max_new_tokens=None,
        sampler="greedy",
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
    ):
        """Continue prompts: strings (tokenized with BOS) or token ids, one or a batch.

        Returns the new text (str or list of str) for string inputs, a list of
        int arrays for token-id inputs; with `return_logprobs`, a `Generation`
        holding tokens, their log-probabilities and text. Rows stop at their
        first stop token (default: <eos> and <end_of_turn>) or stop string.
        `stream=True` returns an iterator of text pieces as tokens arrive (one
        prompt); `stream=callable` calls it with each piece and returns the
        result. `max_length` counts the longest prompt plus new tokens.
        `sliding_window_size` overrides the window at inference time.
        """
        from keras_gemma2.generation.samplers import Sampler, get_sampler

        request = self._generation_request(
            inputs, max_length, max_new_tokens, stop_token_ids, stop_strings, stream,
            sliding_window_size,
        )
        sampler = get_sampler(sampler, temperature, top_k, top_p, min_p)
        _check_output_options(seed, return_logprobs, stream, beam=not isinstance(sampler, Sampler))
        if not isinstance(sampler, Sampler):
            from keras_gemma2.generation.beam_search import beam_search

            return beam_search(self, request, sampler, return_logprobs)
        if stream is True:
            return self._stream(request, sampler, seed)
        if callable(stream):
            pieces = [stream(piece) or piece for piece in self._stream(request, sampler, seed)]
            return "".join(pieces)
        tokens, logprobs, _ = list(
            self.generator.run(
                request["prompts"], request["max_new_tokens"], sampler, request["stop_ids"],
                seed, request["window"],
            )
        )[-1]
        return self._finish(request, tokens, logprobs, return_logprobs)

    def kv_cache_bytes(self, batch_size, max_length, sliding_window_size=None):
        """Bytes of the generation cache (compute dtype; sliding layers hold only their window)."""
        from keras_gemma2.model import kv_cache

        config = self.config
        if sliding_window_size is not None:
            config = config.replace(sliding_window_size=sliding_window_size)
        return kv_cache.cache_bytes(config, batch_size, max_length, self.backbone.compute_dtype)

    def chat(self, messages, **generate_kwargs):
        """The model's next turn for a conversation ([{"role", "content"}, ...])."""
        if self.tokenizer is None:
            raise ValueError("chat() needs a tokenizer: load a preset that has one.")
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.generate(prompt, **generate_kwargs)

    def _generation_request(
        self, inputs, max_length, max_new_tokens, stop_token_ids, stop_strings, stream, window
    ):
        """Validate everything and tokenize, before any compilation."""
        config = self.config
        is_text = isinstance(inputs, str) or (
            isinstance(inputs, (list, tuple)) and any(isinstance(x, str) for x in inputs)
        )
        if is_text:
            batch = [inputs] if isinstance(inputs, str) else list(inputs)
            if not all(isinstance(x, str) for x in batch):
                raise ValueError("A batch of prompts must be all strings or all token-id lists, not a mix.")
            if self.tokenizer is None:
                raise ValueError("Generating from text needs a tokenizer; pass token ids instead.")
            if any(not text for text in batch):
                raise ValueError("Empty prompt: every prompt needs at least one character.")
            for row, text in enumerate(batch):
                check_text(text, "The prompt" if len(batch) == 1 else f"Prompt {row}")
            prompts = self.tokenizer(batch)
            single = isinstance(inputs, str)
        else:
            array = inputs
            if isinstance(array, np.ndarray) or hasattr(array, "shape"):
                array = np.asarray(keras.ops.convert_to_numpy(array)).tolist()
            single = isinstance(array, (list, tuple)) and bool(array) and all(
                isinstance(x, (int, np.integer)) for x in array
            )
            if single:
                array = [array]
            if not isinstance(array, (list, tuple)) or not array:
                raise ValueError(
                    f"Prompts must be a string, a list of strings or token ids; got {type(inputs).__name__}."
                )
            prompts = []
            for row in array:
                if isinstance(row, str):
                    raise ValueError(
                        "A batch of prompts must be all strings or all token-id lists, not a mix."
                    )
                if not isinstance(row, (list, tuple)) or not all(is_integer(x) for x in row):
                    raise ValueError(
                        f"Prompt token ids must be lists of integers; got {row!r}. Pass text "
                        "(with a tokenizer attached) or integer ids."
                    )
                prompts.append([int(x) for x in row])
            if any(len(p) == 0 for p in prompts):
                raise ValueError("Empty prompt: every prompt needs at least one token.")
            flat = [x for p in prompts for x in p]
            if min(flat) < 0 or max(flat) >= config.vocabulary_size:
                raise ValueError(f"Prompt token ids must lie in [0, {config.vocabulary_size}).")
        longest = max(len(p) for p in prompts)

        if max_length is not None and (not is_integer(max_length) or max_length < 1):
            raise ValueError(
                f"max_length must be a positive integer (prompt plus new tokens) or None, got "
                f"{max_length!r} ({type(max_length).__name__})."
            )
        if longest >= config.max_sequence_length:
            raise ValueError(
                f"The prompt has {longest} tokens, which fills the model's context "
                f"(max_sequence_length {config.max_sequence_length}) and leaves no room for new "
                f"tokens. Shorten the prompt to at most {config.max_sequence_length - 1} tokens."
            )
        if max_length is not None and max_length > config.max_sequence_length:
            raise ValueError(
                f"max_length {max_length} exceeds the model's max_sequence_length "
                f"{config.max_sequence_length}."
            )
        if max_length is not None and longest >= max_length:
            raise ValueError(
                f"The prompt ({longest} tokens) leaves no room: max_length is {max_length}. "
                "Raise max_length or shorten the prompt."
            )
        if max_new_tokens is None:
            limit = config.max_sequence_length if max_length is None else max_length
            max_new_tokens = min(256, limit - longest) if max_length is None else limit - longest
        if not is_integer(max_new_tokens) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
        max_new_tokens = int(max_new_tokens)
        if longest + max_new_tokens > config.max_sequence_length:
            raise ValueError(
                f"Prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                f"model's max_sequence_length {config.max_sequence_length}."
            )

        if isinstance(stop_token_ids, str) and stop_token_ids == "auto":
            stop_token_ids = self._default_stop_ids()
        if stop_token_ids is None:
            stop_token_ids = ()
        elif is_integer(stop_token_ids):  # one id
            stop_token_ids = (stop_token_ids,)
        elif isinstance(stop_token_ids, np.ndarray):
            stop_token_ids = stop_token_ids.reshape(-1).tolist()
        if not isinstance(stop_token_ids, (list, tuple, set, frozenset, range)) or not all(
            is_integer(i) for i in stop_token_ids
        ):
            raise ValueError(
                "stop_token_ids must be 'auto', one integer id or a list of integer ids "
                f"(empty for none), got {stop_token_ids!r}."
            )
        stop_ids = tuple(sorted({int(i) for i in stop_token_ids}))
        bad = [i for i in stop_ids if not 0 <= i < config.vocabulary_size]
        if bad:
            raise ValueError(
                f"stop_token_ids {bad} lie outside the vocabulary [0, {config.vocabulary_size})."
            )
        if isinstance(stop_strings, str):
            stop_strings = (stop_strings,)  # one stop string, not its characters
        if stop_strings is None:
            stop_strings = ()
        if not isinstance(stop_strings, (list, tuple, set, frozenset)) or not all(
            isinstance(s, str) and s for s in stop_strings
        ):
            raise ValueError(
                f"stop_strings must be a string or a list of non-empty strings, got {stop_strings!r}."
            )
        if stop_strings and self.tokenizer is None:
            raise ValueError("stop_strings need a tokenizer to read the text.")
        if stream and len(prompts) != 1:
            raise ValueError("Streaming (stream=...) generates one prompt at a time; pass a single prompt.")
        window = config.sliding_window_size if window is None else window
        if isinstance(window, bool) or not isinstance(window, int) or not 0 < window <= config.max_sequence_length:
            raise ValueError(
                f"sliding_window_size must be an integer in [1, {config.max_sequence_length}], got {window!r}."
            )
        return {
            "prompts": prompts,
            "is_text": is_text,
            "single": single,
            "max_new_tokens": max_new_tokens,
            "stop_ids": stop_ids,
            "stop_strings": tuple(stop_strings or ()),
            "window": window,
        }

    def _default_stop_ids(self):
        from keras_gemma2.generation.generator import GEMMA_STOP_IDS, GEMMA_STOP_PIECES

        if self.tokenizer is not None:
            ids = [self.tokenizer.piece_to_id(piece) for piece in GEMMA_STOP_PIECES]
            return [i for i in ids if i is not None]
        return [i for i in GEMMA_STOP_IDS if i < self.config.vocabulary_size]

    def _finish(self, request, tokens, logprobs, return_logprobs):
        from keras_gemma2.generation.generator import Generation, cut_at_stop_string, trim_at_stop

        rows = [trim_at_stop(t, lp, request["stop_ids"]) for t, lp in zip(tokens, logprobs)]
        token_ids = [np.asarray(t, "int32") for t, _ in rows]
        row_logprobs = [np.asarray(lp, "float32") for _, lp in rows]
        texts = None
        if self.tokenizer is not None and (request["is_text"] or request["stop_strings"]):
            texts = []
            for row, ids in enumerate(token_ids):
                text, found = cut_at_stop_string(self.tokenizer.detokenize(ids), request["stop_strings"])
                if found:  # keep only the tokens that make up the kept text
                    keep = _tokens_covering(self.tokenizer, ids, text)
                    token_ids[row], row_logprobs[row] = ids[:keep], row_logprobs[row][:keep]
                texts.append(text)
        if return_logprobs:
            return Generation(token_ids=token_ids, logprobs=row_logprobs, text=texts)
        outputs = texts if request["is_text"] else token_ids
        return outputs[0] if request["single"] else outputs

    def _stream(self, request, sampler, seed):
        """Yield text pieces as the compiled loop produces tokens (one token per chunk)."""
        from keras_gemma2.generation.generator import cut_at_stop_string, trim_at_stop

        if self.tokenizer is None:
            raise ValueError("Streaming text needs a tokenizer.")
        emitted = ""
        for tokens, logprobs, _ in self.generator.run(
            request["prompts"], request["max_new_tokens"], sampler, request["stop_ids"],
            seed, request["window"], chunk=1,
        ):
            ids, _ = trim_at_stop(tokens[0], logprobs[0], request["stop_ids"])
            text, found = cut_at_stop_string(self.tokenizer.detokenize(ids), request["stop_strings"])
            if text.startswith(emitted) and len(text) > len(emitted):
                yield text[len(emitted):]
                emitted = text
            if found:
                return

    # ---- LoRA -------------------------------------------------------------
    def enable_lora(self, rank, target_layers=("query", "value"), alpha=None):
        """Freeze the model; add trainable rank-`rank` adapters to each block's projections.

        `target_layers`: any of query, key, value, attention_output, gate, up, down.
        """
        from keras_gemma2.model import lora

        lora.enable_lora(self, rank, target_layers, alpha)

    def save_lora_weights(self, path):
        from keras_gemma2.model import lora

        lora.save_lora_weights(self, path)

    def load_lora_weights(self, path):
        from keras_gemma2.model import lora

        lora.load_lora_weights(self, path)

    def merge_lora(self):
        """A new model with the adapters folded into the kernels."""
        from keras_gemma2.model import lora

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
        from keras_gemma2.model import quantization

        mode = quantization.check_request(self, mode, config)  # cheap; also for Gemma2CausalLM.quantize(model, ...)
        select = quantization.layer_filter(filters)
        with warnings.catch_warnings():
            # Keras' own quantizers convert variables with np.array (a numpy 2 notice).
            warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
            super().quantize(mode, config=config, filters=select, **kwargs)
        self._generator = None  # compiled generation functions captured the float variables

    def weight_bytes(self):
        """Bytes held by the model's variables (e.g. before and after `quantize`)."""
        from keras_gemma2.model import quantization

        return quantization.weight_bytes(self)

    # ---- presets --------------------------------------------------------
    @classmethod
    def from_preset(cls, preset, dtype=None, **kwargs):
        """Load model and tokenizer from a preset name, directory or handle."""
        from keras_gemma2.checkpoints.presets import load_causal_lm

        return load_causal_lm(preset, dtype=dtype, **kwargs)

    def save_to_preset(self, preset_dir, max_shard_size="4GB"):
        from keras_gemma2.checkpoints.presets import save_preset

        save_preset(self.backbone, preset_dir, tokenizer=self.tokenizer, max_shard_size=max_shard_size)

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
        import os

        from keras_gemma2.tokenizer import Gemma2Tokenizer

        options = getattr(self, "_tokenizer_options", None)
        path = os.path.join(dir_path, "tokenizer.model")
        if options is not None and os.path.exists(path):
            self.tokenizer = Gemma2Tokenizer(path, **options)


def _check_output_options(seed, return_logprobs, stream, beam):
    """`seed`, `return_logprobs` and `stream` checks, so none is ignored or fails mid-generation."""
    if seed is not None and (not is_integer(seed) or not 0 <= seed < 2**31):
        raise ValueError(
            f"seed must be an integer in [0, 2**31 - 1] or None, got {seed!r} "
            f"({type(seed).__name__}); pass e.g. seed=1."
        )
    if not isinstance(return_logprobs, (bool, np.bool_)):
        raise ValueError(f"return_logprobs must be True or False, got {return_logprobs!r}.")
    if not (isinstance(stream, (bool, np.bool_)) or callable(stream)):
        raise ValueError(
            f"stream must be False, True (an iterator of text pieces) or a callable taking each "
            f"piece, got {stream!r}."
        )
    if stream and return_logprobs:
        raise ValueError(
            "return_logprobs=True cannot be combined with stream: streaming yields text pieces "
            "only. Drop stream to get a Generation with log-probabilities."
        )
    if stream and beam:
        raise ValueError(
            "Beam search cannot stream (stream=...): the best beam is known only at the end. "
            "Drop stream, or pick a sampler other than 'beam'."
        )


def _tokens_covering(tokenizer, ids, text):
    """How many leading tokens detokenize to (at least) `text`."""
    for count in range(len(ids) + 1):
        if len(tokenizer.detokenize(ids[:count])) >= len(text):
            return count
    return len(ids)
