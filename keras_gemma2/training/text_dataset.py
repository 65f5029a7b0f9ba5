"""A tf.data.Dataset of text mapped through the preprocessor (any Keras backend can train on it).

Accepted elements, batched (`dataset.batch(n)`): strings [n], (prompt, response)
string pairs ([n], [n]), or {"prompts": [n], "responses": [n]}. Each batch is
tokenized on the host (`tf.numpy_function`) into fixed-length arrays, so the
model sees ({"token_ids", "padding_mask"}, labels, sample_weight) as from in-memory text.
"""

import numpy as np


def mapped(dataset, get_preprocessor):
    """The dataset of batches for a dataset of text; None when its elements are not text.

    `get_preprocessor` is called now (its sequence_length is read once, here),
    not for non-text datasets (a model without a tokenizer trains on ids).
    """
    import tensorflow as tf

    spec = dataset.element_spec
    flat = tf.nest.flatten(spec)
    strings = [s for s in flat if getattr(s, "dtype", None) == tf.string]
    if not strings:
        return None
    if len(strings) != len(flat):
        raise ValueError(
            f"The dataset's elements mix strings with other values ({spec}); give text only "
            "(strings, (prompt, response) pairs or {'prompts', 'responses'}), or token ids only."
        )
    pairs = isinstance(spec, tuple) and len(spec) == 2
    raw = isinstance(spec, dict) and set(spec) == {"prompts", "responses"}
    if not (isinstance(spec, tf.TensorSpec) or pairs or raw):
        raise ValueError(
            f"Unsupported dataset element {spec}: use strings, (prompt, response) pairs or "
            "{'prompts': ..., 'responses': ...}."
        )
    if any(s.shape.rank == 0 for s in flat):
        raise ValueError(
            "The dataset yields one text at a time; batch it first (dataset.batch(8)) so each "
            "element is a batch of texts."
        )
    preprocessor = get_preprocessor()
    length = preprocessor.sequence_length

    def tokenize(*arrays):
        element = tf.nest.pack_sequence_as(spec, list(arrays))
        if pairs:
            x = list(zip(element[0].tolist(), element[1].tolist()))
        elif raw:
            x = {key: np.asarray(value) for key, value in element.items()}
        else:
            x = np.asarray(element)
        inputs, labels, weights = preprocessor(x)
        return inputs["token_ids"], inputs["padding_mask"], labels, weights

    def to_batch(*element):
        element = element[0] if len(element) == 1 else element
        outputs = tf.numpy_function(
            tokenize, tf.nest.flatten(element), [tf.int32, tf.int32, tf.int32, tf.float32]
        )
        for tensor in outputs:
            tensor.set_shape([None, length])
        token_ids, padding_mask, labels, weights = outputs
        return {"token_ids": token_ids, "padding_mask": padding_mask}, labels, weights

    return dataset.map(to_batch)
