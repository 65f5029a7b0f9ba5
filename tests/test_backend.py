"""backend.platform(): the speed workarounds measured on XLA:CPU apply only on the CPU.

On a GPU or TPU (the probe patched to say so) generation keeps its loop on the
device and products stay plain; on this CPU either choice gives the same tokens.
"""

import os
import re

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
    assert backend.float32_result_products() == (on_cpu and keras.backend.backend() == "jax")
    with layers.product_plan(kernel_first_positions=1, one_row=False):  # an export's plan holds anywhere
        assert layers._plan() == {"kernel_first_positions": 1, "one_row": False, "float32_result": False}


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


DECODE_PATHS = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results", "decode_paths.md")


def measured_decode_paths():
    """(section, batch, weights, {"loop": tok/s or None, "host": ...}) for each row of
    benchmarks/results/decode_paths.md (None: that path failed, e.g. out of memory)."""
    section, rows = None, []
    with open(DECODE_PATHS) as f:
        for line in f:
            header = re.match(r"(jax|tensorflow), batch (\d+)", line)
            if header:
                section, batch = line.strip(), int(header.group(2))
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if section and line.startswith("|") and cells[0] in ("float32", "bfloat16", "int8"):
                speeds = {path: float(cell) if re.fullmatch(r"[\d.]+", cell) else None
                          for path, cell in zip(("loop", "host"), cells[1:3])}
                rows.append((section, batch, cells[0], speeds, cells[3]))
    return rows


@pytest.mark.backend_agnostic
def test_the_decode_path_chosen_is_the_one_measured_fastest():
    """backend.steps_from_host picks, for every precision and batch the benchmark measured
    (the 148.5M model and the real 2B, JAX and TensorFlow), the path that ran faster there:
    ties within 10% may go either way; a path that failed (out of memory) is never the faster."""
    rows = measured_decode_paths()
    assert len(rows) >= 12 and any("2b" in section.lower() for section, *_ in rows)
    models = {"float32": tiny(), "bfloat16": tiny(dtype="bfloat16"), "int8": tiny()}
    models["int8"].quantize("int8")
    for section, batch, weights, speeds, recorded in rows:
        picks = "host" if backend.steps_from_host(models[weights], batch) else "loop"
        assert recorded == picks, f"{section}, {weights}: the table was made with another rule"
        loop, host = speeds["loop"], speeds["host"]
        if loop is None or host is None:
            faster = "host" if loop is None else "loop"
        elif max(loop, host) > 1.1 * min(loop, host):
            faster = "host" if host > loop else "loop"
        else:
            continue
        assert picks == faster, f"{section}, {weights}: picks {picks}, measured {speeds}"
