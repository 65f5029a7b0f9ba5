"""Sharding Gemma 2 over a (batch, model) device mesh with keras.distribution (JAX).

Every weight is mapped: the embedding over the vocabulary, query/key/value
and feed-forward gate/up over their output width, the attention output and
down projection over their input width (Megatron-style, one all-reduce per
sublayer), norms replicated. All sharded dims are multiples of 8 in the real
2B/9B/27B, so model axes of 2, 4 or 8 devices divide them.
"""

import keras


def layout_map(device_mesh, model_axis="model"):
    """A keras.distribution.LayoutMap for every Gemma 2 weight path."""
    layouts = keras.distribution.LayoutMap(device_mesh)
    layouts[r"token_embedding/embeddings"] = (model_axis, None)
    # Projection kernels are [out, in].
    layouts[r".*attention/(query|key|value)/kernel"] = (model_axis, None)
    layouts[r".*attention/attention_output/kernel"] = (None, model_axis)
    layouts[r".*feedforward/(gate|up)/kernel"] = (model_axis, None)
    layouts[r".*feedforward/down/kernel"] = (None, model_axis)
    layouts[r".*_norm/scale"] = (None,)
    layouts[r".*lora_kernel_(a|b)"] = (None,)  # adapters are small: replicate
    return layouts


def model_parallel(batch_devices, model_devices, devices=None):
    """keras.distribution.ModelParallel over a (batch, model) mesh with Gemma 2's layout map."""
    devices = devices or keras.distribution.list_devices()
    if batch_devices * model_devices != len(devices):
        raise ValueError(
            f"A {batch_devices} x {model_devices} mesh needs {batch_devices * model_devices} "
            f"devices; {len(devices)} are available."
        )
    mesh = keras.distribution.DeviceMesh(
        shape=(batch_devices, model_devices), axis_names=("batch", "model"), devices=devices
    )
    return keras.distribution.ModelParallel(layout_map=layout_map(mesh), batch_dim_name="batch")
