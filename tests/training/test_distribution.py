"""Sharded training on 8 virtual CPU devices (JAX): layouts and single-device equivalence.

Runs in a subprocess because XLA_FLAGS must be set before JAX starts.
"""

import json
import os
import subprocess
import sys
import textwrap

import keras
import pytest

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="keras.distribution runs on the JAX backend"
)

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np, keras, jax
    sys.path.insert(0, sys.argv[1])
    from helpers import randomize_weights
    from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM, Gemma2Config
    from keras_gemma2.training.distribution import model_parallel

    config = Gemma2Config.from_preset("gemma2_tiny_test")
    token_ids = np.random.default_rng(0).integers(0, 128, (8, 12)).astype("int32")
    x = {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}

    def train(distribution):
        if distribution is not None:
            keras.distribution.set_distribution(distribution)
        model = randomize_weights(Gemma2CausalLM(Gemma2Backbone(config)), seed=1)
        model.compile(optimizer=keras.optimizers.SGD(0.05))
        history = model.fit(x, batch_size=8, epochs=3, shuffle=False, verbose=0)
        return model, history.history["loss"]

    _, single = train(None)
    results = {"devices": len(jax.devices()), "single": single}
    model, results["model_parallel"] = train(model_parallel(2, 4))
    results["specs"] = {
        v.path: list(v.value.sharding.spec) for v in model.backbone.weights
        if v.path.startswith(("token_embedding", "decoder_block_0/", "final_norm"))
    }
    keras.distribution.set_distribution(keras.distribution.DataParallel())
    _, results["data_parallel"] = train(None)
    print("RESULT " + json.dumps(results))
    """
)


def test_model_and_data_parallel_training_match_single_device():
    tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, tests_dir], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.split("RESULT ", 1)[1])
    assert results["devices"] == 8
    specs = results["specs"]
    assert specs["token_embedding/embeddings"] == ["model", None]
    # [out, in] kernels: query/key/gate split their outputs, output/down their inputs.
    assert specs["decoder_block_0/attention/query/kernel"] == ["model", None]
    assert specs["decoder_block_0/attention/key/kernel"] == ["model", None]
    assert specs["decoder_block_0/attention/attention_output/kernel"] == [None, "model"]
    assert specs["decoder_block_0/feedforward/gate/kernel"] == ["model", None]
    assert specs["decoder_block_0/feedforward/down/kernel"] == [None, "model"]
    assert specs["final_norm/scale"] in ([None], [])
    for mode in ("model_parallel", "data_parallel"):
        for ours, reference in zip(results[mode], results["single"]):
            assert abs(ours - reference) <= 1e-4 * max(1.0, abs(reference)), (mode, results)
    assert results["single"][-1] < results["single"][0]
