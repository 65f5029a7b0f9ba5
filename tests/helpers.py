"""Test helpers that build small real artifacts instead of mocking them."""

import io
import os

import keras
import pytest

from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM, Gemma2Config
from keras_gemma2.io.atomic import atomic_write
from keras_gemma2.model import layers

# The tiny configs are registered presets (presets/gemma2_tiny_*.json): shaped
# like the real models (GQA, windows shorter than test sequences), but run in
# milliseconds.
TINY = Gemma2Config.from_preset("gemma2_tiny_test")

# The real Gemma vocabulary is not downloadable in tests, so we train a tiny
# SentencePiece model shaped like it: the same special pieces (looked up by
# name, at DIFFERENT ids for the turn markers), BPE, no text normalization,
# no dummy prefix, whitespace kept, digits split, "\n" as its own piece.
TEST_VOCABULARY_SIZE = 128  # Must equal TINY.vocabulary_size.

_ENGLISH = [
    "The quick brown fox jumps over the lazy dog.",
    "A small model can still learn to tokenize simple text.",
    "Hello, world! How are you today?",
    "What is the capital of France? It is Paris.",
    "Write a short poem about the sea and the sky.",
    "She said: \"Tokens are pieces of words.\"",
    "We trained it in 2024 on 16 cores and 8 GPUs.",
    "Is this the right answer? Yes, it is right.",
    "Keras runs on JAX, TensorFlow and PyTorch.",
    "Gemma is a family of open models from Google.",
    "Please explain why the sky is blue, in one line.",
    "Numbers like 3.14, 42 and 1000 appear in text.",
    "It's a test; don't worry about it.",
    "Zebras, yaks and quails vex the jumping wizard.",
]

_CODE = [
    "def add(a, b):",
    "    return a + b",
    "import numpy as np",
    "x = np.zeros((2, 3), dtype=\"int32\")",
    "for i in range(10):",
    "    print(i * 2 - 1)",
    "if x[0] == y[1] and not z:",
    "    values = {\"key\": [1, 2, 3]}",
    "class Model(object):",
    "    def __init__(self, size=128):",
    "        self.size = size  # the width",
    "while n > 0 and m < 9:",
    "    n -= 1; m += 1",
    "result = [k for k in items if k % 2 == 0]",
    "path = \"/tmp/data/file_name.txt\"",
    "print(f\"{name}: {value!r}\")",
    "assert total >= 0, 'total must be positive'",
    "lambda q: q ** 2 / 4 | 1 & 7 ^ 3 @ w ~ v",
]


def _corpus():
    # Repeat with small variations so BPE sees stable, frequent pairs;
    # every character the tests use appears many times.
    for round_ in range(8):
        for line in _ENGLISH:
            yield line
            yield line.lower()
            yield line.upper() if round_ % 4 == 0 else line
        for line in _CODE:
            yield line
            yield line.replace("x", "y").replace("a", "b") if round_ % 2 else line


def train_test_sentencepiece(path, **overrides):
    """Train a deterministic 128-piece SentencePiece model and return its path.

    `path` is either the model file to write (ending in ".model" or ".spm")
    or a directory, in which case `tokenizer.model` is written inside it.
    Special ids: <pad>=0, <eos>=1, <bos>=2, <unk>=3; <start_of_turn>,
    <end_of_turn> and "\n" are user-defined symbols (ids 4, 5, 6), as in
    Gemma's vocabulary, so they always tokenize to one piece.
    `overrides` replace trainer options, to build deliberately different
    vocabularies (other special ids, missing pieces, a dummy prefix).
    """
    import sentencepiece as spm

    path = os.fspath(path)
    if not path.endswith((".model", ".spm")):
        os.makedirs(path, exist_ok=True)
        path = os.path.join(path, "tokenizer.model")

    options = dict(
        model_type="bpe",
        vocab_size=TEST_VOCABULARY_SIZE,
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>", "\n"],
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        byte_fallback=False,  # 256 byte pieces do not fit in 128.
        hard_vocab_limit=True,
        num_threads=1,
        minloglevel=2,
    )
    options.update(overrides)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_corpus(), model_writer=model, **options
    )
    with atomic_write(path) as f:
        f.write(model.getvalue())
    return path


def tiny(config=TINY, seed=0, dtype=None, tokenizer=None):
    """A fresh tiny model with randomize_weights(seed): for a test that changes its model.

    A test that only reads a model takes conftest's shared `tiny_model` instead: its
    compiled programs are reused across the whole session.
    """
    model = Gemma2CausalLM(Gemma2Backbone(config, dtype=dtype), tokenizer=tokenizer)
    return randomize_weights(model, seed=seed)


def logits_of(model, token_ids, padding_mask=None):
    """The forward's float32 logits as numpy (no padding mask: every position is real)."""
    inputs = {"token_ids": token_ids}
    if padding_mask is not None:
        inputs["padding_mask"] = padding_mask
    return keras.ops.convert_to_numpy(model(inputs)).astype("float32")


def backend_traces(generator):
    """The backend's own count of programs traced for a generator's compiled functions.

    JAX's jit cache sizes / TensorFlow's tracing counts (backend.compile_function's
    `traces()`), summed: a check on the library's own `generator.compilations`.
    """
    total = 0
    for functions in generator._functions.values():
        for function in functions if isinstance(functions, tuple) else (functions,):
            total += function.traces()
    return total


def randomize_weights(model, seed=0, scale=0.2, post_norm_scale=5.0):
    """Random weights whose greedy continuations vary (every weight set, norms included).

    With small weights a tied-embedding model just repeats a token; large
    post-norm scales let the blocks, not the embedding, drive the next token.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    for variable in model.backbone.weights:
        if "/post_" in variable.path:
            values = rng.normal(post_norm_scale, 0.5, variable.shape)
        elif variable.path.endswith("scale"):
            values = rng.normal(0.0, 0.5, variable.shape)
        else:
            values = rng.normal(0.0, scale, variable.shape)
        variable.assign(values.astype("float32"))
    return model


def optimized_hlo(layer, x, blocks=None, **kwargs):
    """XLA's optimized HLO text for `layer(x, **kwargs)`, its weights passed as arguments (not constants).

    `blocks`: the layer's `layers.column_blocks`, also an argument, read as a decode step reads them.
    """
    backend = keras.backend.backend()

    def reading(blocks):
        return layers.reading_column_blocks({} if blocks is None else {layer.path: blocks})

    if backend == "jax":
        import jax

        def call(trainable, non_trainable, x, blocks):
            with reading(blocks):
                return layer.stateless_call(trainable, non_trainable, x, **kwargs)[0]

        values = [[v.value for v in layer.trainable_variables], [v.value for v in layer.non_trainable_variables]]
        return jax.jit(call).lower(*values, x, blocks).compile().as_text()
    if backend == "tensorflow":
        import tensorflow as tf

        def call(x, blocks):
            with reading(blocks):
                return layer(x, **kwargs)

        function = tf.function(call, jit_compile=True)
        return function.experimental_get_compiler_ir(x, blocks)(stage="optimized_hlo")
    pytest.skip("XLA backends only")
