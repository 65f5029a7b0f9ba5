"""Keras' "Distributed tuning with Gemma using Keras" tutorial, on keras_gemma2.

Model parallel over 8 devices with keras.distribution (JAX). Only the import, the preset
(the shipped demo model) and the data (examples/instructions.py's reviews instead of IMDb)
differ from the tutorial. On a CPU, make 8 virtual devices first:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/distributed_tuning.py
"""

import os
import sys

os.environ["KERAS_BACKEND"] = "jax"

import keras  # noqa: E402
import keras_gemma2 as keras_hub  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from instructions import REVIEWS  # noqa: E402

devices = keras.distribution.list_devices()
device_mesh = keras.distribution.DeviceMesh((1, 8), ["batch", "model"], devices=devices)
layout_map = keras_hub.models.GemmaBackbone.get_layout_map(device_mesh)
model_parallel = keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")
keras.distribution.set_distribution(model_parallel)

gemma_lm = keras_hub.models.GemmaCausalLM.from_preset(os.environ.get("PRESET", "gemma2_demo"))

decoder_block_1 = gemma_lm.backbone.get_layer("decoder_block_1")
print(type(decoder_block_1))
for variable in decoder_block_1.weights:
    print(f"{variable.path:<58}  {str(variable.shape):<16}  {str(variable.value.sharding)}")

print(gemma_lm.generate("Best comedy movies: ", max_length=64))

gemma_lm.backbone.enable_lora(rank=4)
gemma_lm.preprocessor.sequence_length = 128
gemma_lm.compile(
    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    optimizer=keras.optimizers.Adam(learning_rate=5e-5),
    weighted_metrics=[keras.metrics.SparseCategoricalAccuracy()],
)
gemma_lm.fit(REVIEWS, epochs=1, batch_size=8)

print(gemma_lm.generate("Best comedy movies: ", max_length=64))
