"""Google's Gemma-with-Keras tutorials (examples/) run on keras_gemma2 and fine-tuning lowers the loss.

The scripts are the tutorials' code with only the import (`import keras_gemma2 as keras_hub`),
the preset (the shipped demo model) and the data changed.
"""

import json
import os
import runpy
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_gemma2

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def loss_on(model, data, sequence_length):
    model.preprocessor.sequence_length = sequence_length
    model.compile()
    return float(model.evaluate(data, batch_size=4, verbose=0)[0])


def base_weights(model):
    """{path: value} of every weight but the LoRA adapters'."""
    return {v.path: keras.ops.convert_to_numpy(v) for v in model.weights if "lora_" not in v.path}


# One epoch of rank-4 LoRA at the tutorial's learning rate (5e-5) lowers the demo model's loss on
# its data by a few thousandths of a nat (5.1464 -> 5.1419 on JAX, -> 5.1432 on TensorFlow); the
# distributed tutorial's few batches of 8 by ~4e-4 (5.66842 -> 5.66800; runs differ by ~4e-6). A
# broken update (no step, adapters that do not train) leaves the loss where it was.
MARGIN = 0.001
DISTRIBUTED_MARGIN = 1e-4


def test_the_lora_tutorial_runs_and_lowers_the_loss_on_its_data(capsys):
    tutorial = runpy.run_path(os.path.join(EXAMPLES, "lora_finetuning.py"), run_name="__main__")
    tuned, data, prompt = tutorial["gemma_lm"], tutorial["data"], tutorial["prompt"]
    printed = capsys.readouterr().out
    assert tuned.backbone.lora_targets == ("query", "value")
    assert tuned.preprocessor.sequence_length == 256
    base = keras_gemma2.from_preset("gemma2_demo")
    # What the tutorial printed are generate's continuations, before and after tuning: never the prompt.
    base.compile(sampler=tutorial["sampler"])
    for model in (base, tuned):
        continuation = model.generate(prompt, max_length=256)
        assert continuation and continuation in printed
    assert "Instruction:" not in printed
    # LoRA trained the adapters only, and they lowered the loss.
    frozen, trained = base_weights(base), base_weights(tuned)
    assert frozen.keys() == trained.keys() and all(np.array_equal(frozen[k], trained[k]) for k in frozen)
    before, after = loss_on(base, data, 256), loss_on(tuned, data, 256)
    assert after < before - MARGIN, (before, after)


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="keras.distribution's ModelParallel runs on JAX")
def test_the_distributed_tutorial_shards_over_8_devices_and_lowers_the_loss():
    script = os.path.join(EXAMPLES, "distributed_tuning.py")
    check = f"""
import json, runpy, keras, keras_gemma2
tutorial = runpy.run_path({script!r}, run_name="__main__")
tuned = tutorial["gemma_lm"]
def loss(model):
    model.preprocessor.sequence_length = 128
    model.compile()
    return float(model.evaluate(tutorial["REVIEWS"], batch_size=8, verbose=0)[0])
query = tuned.backbone.get_layer("decoder_block_1").attention.query._kernel  # the base kernel (LoRA adds A B)
base = keras_gemma2.from_preset("gemma2_demo")
trained = {{v.path: v for v in tuned.weights if "lora_" not in v.path}}
frozen = sorted(trained) == sorted(v.path for v in base.weights) and all(
    (keras.ops.convert_to_numpy(v) == keras.ops.convert_to_numpy(trained[v.path])).all() for v in base.weights)
print("RESULT", json.dumps({{"devices": len(keras.distribution.list_devices()),
    "query_sharding": str(query.value.sharding.spec), "after": loss(tuned), "before": loss(base),
    "base_weights_unchanged": bool(frozen)}}))
"""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "KERAS_BACKEND": "jax"}
    done = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "NamedSharding" in done.stdout and "'model'" in done.stdout  # the tutorial's printout
    result = json.loads(done.stdout.split("RESULT ", 1)[1].splitlines()[0])
    assert result["devices"] == 8 and result["query_sharding"] in ("PartitionSpec('model', None)", "P('model', None)")
    assert result["base_weights_unchanged"] and result["after"] < result["before"] - DISTRIBUTED_MARGIN, result


def test_the_keras_hub_names_are_these_classes():
    assert keras_gemma2.models.GemmaCausalLM is keras_gemma2.Gemma2CausalLM
    assert keras_gemma2.models.GemmaBackbone is keras_gemma2.Gemma2Backbone
    sampler = keras_gemma2.samplers.TopKSampler(k=5, seed=2)
    assert (sampler.sampler, sampler.seed) == (keras_gemma2.Sampler(top_k=5), 2)
    mesh = keras.distribution.DeviceMesh((1, 1), ["batch", "model"], devices=["cpu:0"])
    layout = keras_gemma2.models.GemmaBackbone.get_layout_map(mesh)
    assert tuple(layout["decoder_block_0/attention/key/kernel"].axes) == ("model", None)
    assert tuple(layout["decoder_block_0/feedforward/down/kernel"].axes) == (None, "model")
