"""Text files to training batches: tokenize, pack, and draw batches by step number.

Documents are tokenized with BOS (and EOS) and concatenated into one token
stream; a training example is a window of `sequence_length` tokens. Batch k
is a pure function of (seed, k), so a resumed run sees exactly the batches
it would have seen.
"""

import os

import numpy as np


def read_texts(paths):
    """The text of each file; clear errors for missing, unreadable or empty files."""
    if not paths:
        raise ValueError("No data files given.")
    texts = []
    for path in paths:
        if os.path.isdir(path):
            raise ValueError(f"Data file {path!r} is a folder; pass the text files in it (e.g. {path}/*.txt).")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Data file {path!r} does not exist.")
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"Cannot read data file {path!r} as UTF-8 text: {error}.") from error
        if not text.strip():
            raise ValueError(f"Data file {path!r} is empty.")
        texts.append(text)
    return texts


def token_stream(tokenizer, texts):
    """One int32 array: BOS + document + EOS, for every document in order."""
    pieces = []
    for ids in tokenizer(list(texts), add_bos=True, add_eos=True):
        pieces.append(np.asarray(ids, "int32"))
    return np.concatenate(pieces)


def batch_at(stream, step, batch_size, sequence_length, seed=0):
    """Training batch number `step`: random windows of the stream, reproducible."""
    if len(stream) <= sequence_length:
        raise ValueError(
            f"The data has {len(stream)} tokens, fewer than one sequence of {sequence_length}; "
            "add data or lower the sequence length."
        )
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(stream) - sequence_length + 1, batch_size)
    token_ids = np.stack([stream[s : s + sequence_length] for s in starts])
    return {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}


def evaluation_batches(stream, batch_size, sequence_length, max_batches=None):
    """Consecutive, non-overlapping windows of a held-out stream (the last partial one padded)."""
    windows = []
    for start in range(0, len(stream) - 1, sequence_length):
        chunk = stream[start : start + sequence_length]
        if len(chunk) >= 2:
            windows.append(chunk)
    batches = []
    for first in range(0, len(windows), batch_size):
        group = windows[first : first + batch_size]
        token_ids = np.zeros((len(group), sequence_length), "int32")
        padding_mask = np.zeros_like(token_ids)
        for row, chunk in enumerate(group):
            token_ids[row, : len(chunk)] = chunk
            padding_mask[row, : len(chunk)] = 1
        batches.append({"token_ids": token_ids, "padding_mask": padding_mask})
        if max_batches and len(batches) >= max_batches:
            break
    return batches
