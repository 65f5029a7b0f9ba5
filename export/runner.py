"""On-device reference runner for an exported Gemma 2 (LiteRT .tflite or SavedModel).

It does what a phone app does, with only numpy, sentencepiece and the plain
`ai_edge_litert` interpreter (no Keras, no Flex delegate), over the signature
contract of Google's LiteRT-LM engine (see keras_gemma2/edge/export.py):

* the KV caches (`kv_cache_k_{i}`, `kv_cache_v_{i}` per layer, float32 [1,
  kv_heads, cache_length, head_dim]) start as zeros and are carried by name
  from each call's outputs into the next call's inputs;
* the prompt (BOS first) but its last token is prefilled in chunks:
  `prefill_{T}` takes `tokens` int32 [1, T] and `input_pos` int32 [T] and
  returns the caches. Each chunk uses the largest bucket T not longer than
  what remains, or the smallest bucket when every bucket is longer; its unused
  rows get token 0 at position 0, as the engine fills them. A prompt is only
  limited by the cache, not by the buckets;
* `decode` (`tokens` [1, 1], `input_pos` [1] and the caches -> `logits`
  [1, 1, vocab] and the caches) runs the last prompt token at its position,
  which gives the first token's logits, then each picked token in turn, until
  a stop id, the token budget or the end of the cache.

    python export/runner.py model.tflite "def fib(n):" --max-new-tokens 64
    python export/runner.py model.tflite --chat "Why is the sky blue?"
    python export/runner.py saved_model_dir "prompt"          # a SavedModel export

Library use: `Runner.load(path).generate("prompt")`, `.stream(...)`, `.chat(messages)`.
A .litertlm bundle runs in the LiteRT-LM engine itself (`keras-gemma2 run`).
"""

import json
import os
import sys
import time

import numpy as np

METADATA_NAME = "keras_gemma2_export.json"  # inside a SavedModel directory


class LiteRTSession:
    """The .tflite signatures through ai_edge_litert's signature runners."""

    def __init__(self, path, num_threads=None):
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=path, num_threads=num_threads)
        self._runners = {}

    def __call__(self, signature, **inputs):
        if signature not in self._runners:
            self._runners[signature] = self.interpreter.get_signature_runner(signature)
        return self._runners[signature](**inputs)


class SavedModelSession:
    """The same signatures from `tf.saved_model.load` (for the SavedModel export)."""

    def __init__(self, path):
        import tensorflow as tf

        self.tf = tf
        self.loaded = tf.saved_model.load(path)

    def __call__(self, signature, **inputs):
        outputs = self.loaded.signatures[signature](
            **{name: self.tf.constant(value) for name, value in inputs.items()}
        )
        return {name: value.numpy() for name, value in outputs.items()}


class Runner:
    """Greedy (or temperature) generation over an exported model's prefill/decode signatures."""

    def __init__(self, session, metadata, tokenizer=None):
        self.session = session
        self.metadata = metadata
        self.tokenizer = tokenizer
        self.cache_length = metadata["cache_length"]
        self.prefill_lengths = sorted(metadata["prefill_lengths"])
        self.stop_ids = set(metadata["stop_token_ids"])
        self.cache_names = [name for pair in metadata["cache_names"] for name in pair]
        self.cache_shape = tuple(metadata["cache_shape"])
        self.stats = {}

    @classmethod
    def load(cls, path, num_threads=None):
        """A .tflite file (metadata `<stem>.json` beside it) or a SavedModel directory."""
        path = os.path.abspath(path)
        if path.endswith(".litertlm"):
            raise ValueError(
                f"{path} is a LiteRT-LM bundle: it runs in the LiteRT-LM engine (`keras-gemma2 run`). "
                "This runner drives the .tflite and SavedModel exports."
            )
        if path.endswith(".tflite"):
            directory, stem = os.path.dirname(path), os.path.basename(path)[: -len(".tflite")]
            metadata = _read_json(os.path.join(directory, f"{stem}.json"))
            session = LiteRTSession(path, num_threads)
        elif os.path.isdir(path):
            directory = path
            metadata = _read_json(os.path.join(path, METADATA_NAME))
            session = SavedModelSession(path)
        else:
            raise FileNotFoundError(f"{path}: expected an exported .tflite file or SavedModel directory.")
        tokenizer = None
        if metadata["files"].get("tokenizer"):
            import sentencepiece

            tokenizer = sentencepiece.SentencePieceProcessor(
                model_file=os.path.join(directory, metadata["files"]["tokenizer"])
            )
        return cls(session, metadata, tokenizer)

    # ---- text <-> ids -------------------------------------------------------
    def encode(self, text):
        if self.tokenizer is None:
            raise ValueError("This export has no tokenizer file; pass token ids instead of text.")
        return [self.metadata["bos_token_id"]] + list(self.tokenizer.encode(text))

    def decode_text(self, ids):
        return self.tokenizer.decode([int(i) for i in ids if int(i) not in self.stop_ids])

    def chat_prompt(self, messages):
        template = self.metadata["chat_template"]
        turns = [
            template["turn"].format(role=template["roles"][m["role"]], content=m["content"].strip())
            for m in messages
        ]
        return "".join(turns) + template["generation_prompt"]

    # ---- the signatures -----------------------------------------------------
    def empty_caches(self):
        """Every layer's key and value cache, zeros, by input name."""
        return {name: np.zeros(self.cache_shape, np.float32) for name in self.cache_names}

    def chunks(self, count):
        """The buckets that prefill `count` tokens: the largest not longer than what remains,
        else (the rest is shorter than every bucket) the smallest."""
        buckets = []
        while count > 0:
            fitting = [p for p in self.prefill_lengths if p <= count]
            bucket = fitting[-1] if fitting else self.prefill_lengths[0]
            buckets.append(bucket)
            count -= min(bucket, count)
        return buckets

    def _prefill(self, ids, caches, start=0):
        """Write `ids` (at positions start, start + 1, ...) into `caches`, chunk by chunk.

        Returns the caches and the buckets used. A chunk's unused rows get
        token 0 at position 0, as the LiteRT-LM engine fills them.
        """
        buckets = self.chunks(len(ids))
        offset = 0
        for bucket in buckets:
            chunk = ids[offset: offset + bucket]
            tokens = np.zeros((1, bucket), np.int32)
            tokens[0, : len(chunk)] = chunk
            positions = np.zeros((bucket,), np.int32)
            positions[: len(chunk)] = np.arange(start + offset, start + offset + len(chunk))
            outputs = self.session(
                self.metadata["signatures"]["prefill"][str(bucket)],
                tokens=tokens, input_pos=positions, **caches,
            )
            caches = {name: outputs[name] for name in self.cache_names}
            offset += len(chunk)
        return caches, buckets

    def _decode(self, caches, token, position):
        """One step: `token` at `position` with `caches`; returns its logits [vocab] and the caches."""
        outputs = self.session(
            self.metadata["signatures"]["decode"],
            tokens=np.array([[token]], np.int32), input_pos=np.array([position], np.int32), **caches,
        )
        return outputs["logits"][0, -1], {name: outputs[name] for name in self.cache_names}

    def _start(self, ids):
        """Prefill ids[:-1], then decode ids[-1] at its position: the first logits, the caches, buckets."""
        caches, buckets = self._prefill(ids[:-1], self.empty_caches())
        logits, caches = self._decode(caches, ids[-1], len(ids) - 1)
        return logits, caches, buckets

    def _check_prompt(self, ids):
        if not ids:
            raise ValueError("Empty prompt.")
        if len(ids) >= self.cache_length:
            raise ValueError(
                f"Prompt of {len(ids)} tokens does not fit the {self.cache_length}-position cache "
                f"(at most {self.cache_length - 1} prompt tokens); re-export with a larger cache_length."
            )

    # ---- generation ---------------------------------------------------------
    def token_stream(self, prompt, max_new_tokens=64, temperature=0.0, seed=0):
        """Yield generated token ids one at a time (the stop id is not yielded).

        `stats`: prompt_tokens, chunks (the prefill buckets used, in order),
        prefill_s (time to the first logits: the chunks and the last prompt
        token's decode), decode_steps and decode_s (the steps after it).
        """
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
        self._check_prompt(ids)
        rng = np.random.default_rng(seed)
        start = time.perf_counter()
        logits, caches, buckets = self._start(ids)
        self.stats = {"prompt_tokens": len(ids), "chunks": buckets,
                      "prefill_s": time.perf_counter() - start, "decode_steps": 0, "decode_s": 0.0}
        position = len(ids)
        for step in range(max_new_tokens):
            token = _pick(logits, temperature, rng)
            if token in self.stop_ids:
                return
            yield token
            if step == max_new_tokens - 1 or position >= self.cache_length:  # done, or the cache is full
                return
            start = time.perf_counter()
            logits, caches = self._decode(caches, token, position)
            self.stats["decode_steps"] += 1
            self.stats["decode_s"] += time.perf_counter() - start
            position += 1

    def generate(self, prompt, max_new_tokens=64, temperature=0.0, seed=0):
        """Text for a text prompt, token ids for an id prompt."""
        ids = list(self.token_stream(prompt, max_new_tokens, temperature, seed))
        return self.decode_text(ids) if isinstance(prompt, str) else ids

    def stream(self, prompt, max_new_tokens=64, temperature=0.0, seed=0):
        """Yield text pieces as tokens arrive (each the new suffix of the decoded text)."""
        ids, shown = [], ""
        for token in self.token_stream(prompt, max_new_tokens, temperature, seed):
            ids.append(token)
            text = self.decode_text(ids)
            if len(text) > len(shown) and not text.endswith("\ufffd"):
                yield text[len(shown):]
                shown = text

    def chat(self, messages, max_new_tokens=256, **kwargs):
        return self.generate(self.chat_prompt(messages), max_new_tokens, **kwargs)

    def teacher_forced_argmax(self, ids, prompt_length=1):
        """Top-1 prediction for each of ids[prompt_length:], feeding the true tokens.

        Prefills ids[:prompt_length] (chunked, as a prompt), then decodes the
        given tokens one by one; entry t predicts ids[prompt_length + t]. For
        quantization checks.
        """
        ids = [int(i) for i in ids][: self.cache_length]
        self._check_prompt(ids[:prompt_length])
        logits, caches, _ = self._start(ids[:prompt_length])
        predictions = []
        for position in range(prompt_length, len(ids)):
            predictions.append(int(np.argmax(logits)))
            if position == len(ids) - 1:
                break
            logits, caches = self._decode(caches, ids[position], position)
        return np.array(predictions, np.int32)


def _pick(logits, temperature, rng):
    if temperature <= 0:
        return int(np.argmax(logits))
    scaled = (logits - logits.max()) / temperature
    probabilities = np.exp(scaled)
    return int(rng.choice(len(probabilities), p=probabilities / probabilities.sum()))


def _read_json(path):
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: it is written by keras_gemma2.export beside the model.")
    with open(path) as f:
        return json.load(f)


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="exported .tflite file or SavedModel directory")
    parser.add_argument("prompt")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in Gemma's chat template")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    runner = Runner.load(args.model, args.threads)
    prompt = runner.chat_prompt([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    for piece in runner.stream(prompt, args.max_new_tokens, args.temperature):
        print(piece, end="", flush=True)
    stats = runner.stats
    chunks = "+".join(str(bucket) for bucket in stats["chunks"]) or "none"
    print(
        f"\n[prefill {stats['prompt_tokens']} tokens (chunks {chunks}) in "
        f"{stats['prefill_s'] * 1000:.0f} ms; {stats['decode_steps']} decode steps "
        f"at {stats['decode_steps'] / max(stats['decode_s'], 1e-9):.1f} tok/s]",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
