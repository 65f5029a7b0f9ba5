"""backend.platform(): the speed workarounds measured on XLA:CPU apply only on the CPU.

On a GPU or TPU (the probe patched to say so) generation keeps its loop on the
device and products stay plain; on this CPU either choice gives the same tokens.
"""

import keras
import numpy as np
import pytest

from helpers import tiny
from keras_gemma2 import backend
from keras_gemma2.model import layers

PROMPT = [[3, 17, 29, 4]]


@pytest.fixture(params=["cpu", "gpu", "tpu"])
def platform(request, monkeypatch):
    """The platform the probe reports (this machine is a CPU)."""
    monkeypatch.setattr(backend, "_probe_platform", lambda: request.param)
    return request.param


def test_the_probe_finds_this_machines_cpu():
    assert backend.platform() == "cpu" and backend.on_cpu()


def test_cpu_workarounds_are_decided_by_the_platform(platform):
    on_cpu = platform == "cpu"
    model = tiny(dtype="bfloat16")
    # A bfloat16 batch of one: driven from the host only on the CPU (PyTorch always loops in Python).
    assert backend.steps_from_host(model, 1) == (on_cpu or keras.backend.backend() == "torch")
    one_row = keras.ops.ones((1, 1, 8))
    assert layers.is_one_row(one_row) == (on_cpu and backend.compiles())
    assert layers._plan()["kernel_first_positions"] == (layers.KERNEL_FIRST_POSITIONS if on_cpu else 0)
    with layers.product_plan(kernel_first_positions=1, one_row=False):  # an export's plan holds anywhere
        assert layers._plan() == {"kernel_first_positions": 1, "one_row": False}


def test_int8_one_row_products_gather_their_input_only_on_the_cpu(platform, monkeypatch):
    if not backend.compiles():
        pytest.skip("PyTorch takes no one-row path")
    gathered = []
    monkeypatch.setattr(layers, "computed_once", lambda row: gathered.append(row) or row)
    model = tiny()
    model.quantize("int8")
    model.generate(PROMPT, max_new_tokens=3, stop_token_ids=())
    assert bool(gathered) == (platform == "cpu")


@pytest.mark.parametrize("dtype, quantize", [("bfloat16", None), ("float32", "int8")])
def test_either_choice_gives_the_same_tokens_on_the_cpu(dtype, quantize, monkeypatch):
    outputs = {}
    for platform in ("cpu", "gpu"):
        monkeypatch.setattr(backend, "_probe_platform", lambda: platform)
        model = tiny(dtype=dtype)  # a new model: programs traced under this platform's choices
        if quantize:
            model.quantize(quantize)
        result = model.generate(PROMPT, max_new_tokens=8,
                                stop_token_ids=(), return_logprobs=True)
        outputs[platform] = (result.token_ids[0].tolist(), np.asarray(result.logprobs[0]))
    assert outputs["cpu"][0] == outputs["gpu"][0]
    np.testing.assert_allclose(outputs["cpu"][1], outputs["gpu"][1], atol=0.05)
