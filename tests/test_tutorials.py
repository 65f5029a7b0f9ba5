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
import pytest

import keras_gemma2

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def loss_on(model, data, sequence_length):
    model.preprocessor.sequence_length = sequence_length
    model.compile()
    return float(model.evaluate(data, batch_size=4, verbose=0)[0])


def test_the_lora_tutorial_runs_and_lowers_the_loss_on_its_data(capsys):
    tutorial = runpy.run_path(os.path.join(EXAMPLES, "lora_finetuning.py"), run_name="__main__")
    tuned, data = tutorial["gemma_lm"], tutorial["data"]
    printed = capsys.readouterr().out
    assert "Instruction:" not in printed.split("Total params")[0]  # generate prints continuations only
    assert tuned.backbone.lora_targets == ("query", "value")
    assert tuned.preprocessor.sequence_length == 256
    before = loss_on(keras_gemma2.from_preset("gemma2_demo"), data, 256)
    after = loss_on(tuned, data, 256)
    assert after < before, (before, after)


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
print("RESULT", json.dumps({{"devices": len(keras.distribution.list_devices()),
    "query_sharding": str(query.value.sharding.spec), "after": loss(tuned),
    "before": loss(keras_gemma2.from_preset("gemma2_demo"))}}))
"""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "KERAS_BACKEND": "jax"}
    done = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "NamedSharding" in done.stdout and "'model'" in done.stdout  # the tutorial's printout
    result = json.loads(done.stdout.split("RESULT ", 1)[1].splitlines()[0])
    assert result["devices"] == 8 and result["query_sharding"] in ("PartitionSpec('model', None)", "P('model', None)")
    assert result["after"] < result["before"], result


def test_the_keras_hub_names_are_these_classes():
    assert keras_gemma2.models.GemmaCausalLM is keras_gemma2.Gemma2CausalLM
    assert keras_gemma2.models.GemmaBackbone is keras_gemma2.Gemma2Backbone
    sampler = keras_gemma2.samplers.TopKSampler(k=5, seed=2)
    assert (sampler.sampler, sampler.seed) == (keras_gemma2.Sampler(top_k=5), 2)
    mesh = keras.distribution.DeviceMesh((1, 1), ["batch", "model"], devices=["cpu:0"])
    layout = keras_gemma2.models.GemmaBackbone.get_layout_map(mesh)
    assert tuple(layout["decoder_block_0/attention/key/kernel"].axes) == ("model", None)
    assert tuple(layout["decoder_block_0/feedforward/down/kernel"].axes) == (None, "model")
