"""Keras' fit / evaluate / predict with the data checked first and the weights never lost.

Inside a compiled train step the token ids are traced values: an id outside
the vocabulary cannot raise there. JAX then gathers garbage and every weight
turns NaN without an error; TensorFlow fails deep inside GatherV2. So each
batch is checked on the host before its step.

Keras' JAX trainer also detaches the variables' values while it trains and
reattaches them at the end; a step that fails before the first update
(a rejected input, an interrupt) used to leave every variable empty, and
every later call raised `'NoneType' object is not callable`. `fit` and
friends put the detached values back when they fail.
"""

import contextlib
import inspect

import keras
import numpy as np

from keras_gemma2.model.backbone import check_token_ids


def check_batch(x, y, vocabulary_size):
    """Raise ValueError, naming the input, on ids outside [0, vocabulary_size) or mismatched shapes.

    `x` is token ids or a dict holding "token_ids" (and usually "padding_mask");
    `y`, when given as integer labels, must be in the vocabulary too. Values
    that are not concrete arrays (symbolic tensors) are left to the model.
    """
    ids = x.get("token_ids") if isinstance(x, dict) else x
    ids = _host_array(ids)
    if ids is None:
        return
    check_token_ids(ids, vocabulary_size, "token_ids")
    if isinstance(x, dict) and x.get("padding_mask") is not None:
        mask = _host_array(x["padding_mask"])
        if mask is not None and mask.shape != ids.shape:
            raise ValueError(
                f"`padding_mask` shape {mask.shape} must equal `token_ids` shape {ids.shape} "
                "(1 for real tokens, 0 for padding, one entry per token)."
            )
    labels = _host_array(y)
    if labels is not None and labels.dtype.kind in "iu":
        check_token_ids(labels, vocabulary_size, "labels (y)")


def _host_array(value):
    """A numpy view of a concrete array or tensor; None for anything else."""
    if value is None or isinstance(value, keras.KerasTensor):
        return None
    if isinstance(value, (list, tuple)):
        try:
            return np.asarray(value)
        except ValueError:  # ragged lists: the model's own checks name the problem
            return None
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        try:
            return np.asarray(keras.ops.convert_to_numpy(value))
        except Exception:  # a symbolic or traced tensor
            return None
    return None


def _checked_data(x, y, vocabulary_size):
    """Check in-memory data now; wrap streamed data so each batch is checked before its step."""
    if x is None or isinstance(x, (dict, np.ndarray, list, tuple)) or hasattr(x, "shape"):
        check_batch(x, y, vocabulary_size)
        return x
    if is_tf_dataset(x):
        return _checked_tf_dataset(x, vocabulary_size)
    if isinstance(x, keras.utils.PyDataset):
        return _CheckedPyDataset(x, vocabulary_size)
    if inspect.isgenerator(x) or (hasattr(x, "__next__") and hasattr(x, "__iter__")):
        return _checked_iterator(x, vocabulary_size)
    return x  # e.g. a torch DataLoader: the model's own checks still apply eagerly


def _unpack(batch):
    if isinstance(batch, tuple):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


def _checked_iterator(iterator, vocabulary_size):
    for batch in iterator:
        check_batch(*_unpack(batch), vocabulary_size)
        yield batch


class _CheckedPyDataset(keras.utils.PyDataset):
    """A PyDataset that checks each batch it hands out."""

    def __init__(self, dataset, vocabulary_size):
        super().__init__(
            workers=dataset.workers, use_multiprocessing=dataset.use_multiprocessing,
            max_queue_size=dataset.max_queue_size,
        )
        self._dataset, self._vocabulary_size = dataset, vocabulary_size

    def __getitem__(self, index):
        batch = self._dataset[index]
        check_batch(*_unpack(batch), self._vocabulary_size)
        return batch

    @property
    def num_batches(self):
        return self._dataset.num_batches

    def on_epoch_begin(self):
        self._dataset.on_epoch_begin()

    def on_epoch_end(self):
        self._dataset.on_epoch_end()


def is_tf_dataset(x):
    module = type(x).__module__
    return module.startswith("tensorflow") and hasattr(x, "element_spec")


def _checked_tf_dataset(dataset, vocabulary_size):
    """The dataset with each batch checked by a host call (one small copy of the ids per batch)."""
    import tensorflow as tf

    def check(*batch):
        def run(*arrays):
            check_batch(*_unpack(tf.nest.pack_sequence_as(batch, list(arrays))), vocabulary_size)
            return np.int32(0)

        flat = tf.nest.flatten(batch)
        done = tf.numpy_function(run, flat, tf.int32)
        with tf.control_dependencies([done]):
            return tf.nest.map_structure(tf.identity, batch if len(batch) > 1 else batch[0])

    return dataset.map(check)


@contextlib.contextmanager
def weights_kept_on_failure(model):
    """If the wrapped Keras call fails, put back any variable value the JAX trainer detached."""
    if keras.backend.backend() != "jax":
        yield
        return
    variables = list(model.variables)
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None:
        variables += list(optimizer.variables)
    variables += list(getattr(model, "metrics_variables", []))
    kept = [(variable, variable._value) for variable in variables]
    try:
        yield
    except BaseException:
        lost = []
        for variable, value in kept:
            if variable._value is None:
                if value is None or value.is_deleted():
                    lost.append(variable.path)
                else:
                    variable._value = value
        if lost:  # only if a failing step had already consumed the buffers (not seen in practice)
            raise RuntimeError(
                f"Training failed after the weights' buffers were reused; {len(lost)} variables "
                f"(e.g. {lost[0]}) have no value. Reload the model or resume from a checkpoint."
            )
        raise


class CheckedTraining:
    """Mixin for a keras.Model with a `config`: checked data in, weights kept on failure.

    Place it before keras.Model in the bases. Subclasses name the vocabulary
    their token ids must lie in with `config.vocabulary_size`.
    """

    def _vocabulary_size(self):
        return self.config.vocabulary_size

    def _from_text(self, x, y, kwargs):
        """Hook: text inputs turned into (x, y, kwargs) the model trains on; as given here."""
        return x, y, kwargs

    def fit(self, x=None, y=None, *args, **kwargs):
        x, y, kwargs = self._from_text(x, y, kwargs)
        validation = kwargs.get("validation_data")
        if validation is not None and not isinstance(validation, tuple):
            inputs, labels, extra = self._from_text(validation, None, {})
            # In-memory text comes back as arrays with labels and weights; a dataset as a dataset.
            kwargs["validation_data"] = (inputs, labels, extra["sample_weight"]) if "sample_weight" in extra else inputs
        x = _checked_data(x, y, self._vocabulary_size())
        validation = kwargs.get("validation_data")
        if isinstance(validation, tuple):
            check_batch(validation[0], validation[1] if len(validation) > 1 else None,
                        self._vocabulary_size())
        elif validation is not None:
            kwargs["validation_data"] = _checked_data(validation, None, self._vocabulary_size())
        with weights_kept_on_failure(self):
            return super().fit(x, y, *args, **kwargs)

    def evaluate(self, x=None, y=None, *args, **kwargs):
        x, y, kwargs = self._from_text(x, y, kwargs)
        x = _checked_data(x, y, self._vocabulary_size())
        with weights_kept_on_failure(self):
            return super().evaluate(x, y, *args, **kwargs)

    def predict(self, x, *args, **kwargs):
        x, _, _ = self._from_text(x, None, {})
        x = _checked_data(x, None, self._vocabulary_size())
        with weights_kept_on_failure(self):
            return super().predict(x, *args, **kwargs)

    def train_on_batch(self, x, y=None, *args, **kwargs):
        check_batch(x, y, self._vocabulary_size())
        with weights_kept_on_failure(self):
            return super().train_on_batch(x, y, *args, **kwargs)

    def test_on_batch(self, x, y=None, *args, **kwargs):
        check_batch(x, y, self._vocabulary_size())
        with weights_kept_on_failure(self):
            return super().test_on_batch(x, y, *args, **kwargs)

    def predict_on_batch(self, x):
        check_batch(x, None, self._vocabulary_size())
        with weights_kept_on_failure(self):
            return super().predict_on_batch(x)
