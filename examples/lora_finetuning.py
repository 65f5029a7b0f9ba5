"""Keras' "Fine-tune Gemma models in Keras using LoRA" tutorial, on keras_gemma2.

Only the import (keras_gemma2 in keras_hub's place), the preset (the shipped demo model) and
the data (examples/instructions.py instead of Databricks Dolly) differ from the tutorial.

    KERAS_BACKEND=jax python examples/lora_finetuning.py   # or tensorflow / torch
"""

import os
import sys

import keras
import keras_gemma2 as keras_hub

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from instructions import RECORDS  # noqa: E402

gemma_lm = keras_hub.models.GemmaCausalLM.from_preset(os.environ.get("PRESET", "gemma2_demo"))
gemma_lm.summary()

template = "Instruction:\n{instruction}\n\nResponse:\n{response}"
data = [template.format(**record) for record in RECORDS]

prompt = template.format(instruction="What should I do on a trip to Europe?", response="")
sampler = keras_hub.samplers.TopKSampler(k=5, seed=2)
gemma_lm.compile(sampler=sampler)
print(gemma_lm.generate(prompt, max_length=256))

# LoRA: the base weights freeze, rank-4 adapters train.
gemma_lm.backbone.enable_lora(rank=4)
gemma_lm.summary()

gemma_lm.preprocessor.sequence_length = 256
optimizer = keras.optimizers.AdamW(learning_rate=5e-5, weight_decay=0.01)
optimizer.exclude_from_weight_decay(var_names=["bias", "scale"])
gemma_lm.compile(
    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    optimizer=optimizer,
    weighted_metrics=[keras.metrics.SparseCategoricalAccuracy()],
)
gemma_lm.fit(data, epochs=1, batch_size=1)

gemma_lm.compile(sampler=sampler)
print(gemma_lm.generate(prompt, max_length=256))
