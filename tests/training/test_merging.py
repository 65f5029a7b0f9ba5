"""Model merging: weighted averages and interpolation of checkpoints on disk."""

import keras
import numpy as np
import pytest

from helpers import randomize_weights
from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM, Gemma2Config
from keras_gemma2.cli import main
from keras_gemma2.training.merging import average_checkpoints, interpolate

TINY = Gemma2Config.from_preset("gemma2_tiny_test")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    paths, weights = [], []
    for seed in range(3):
        model = randomize_weights(Gemma2CausalLM(Gemma2Backbone(TINY)), seed=seed)
        path = str(root / f"ckpt{seed}")
        model.save_to_preset(path)
        paths.append(path)
        weights.append({v.path: keras.ops.convert_to_numpy(v.value) for v in model.backbone.weights})
    return paths, weights


def merged_weights(model):
    return {v.path: keras.ops.convert_to_numpy(v.value) for v in model.backbone.weights}


def test_uniform_and_weighted_average(checkpoints):
    paths, weights = checkpoints
    uniform = merged_weights(average_checkpoints(paths))
    weighted = merged_weights(average_checkpoints(paths, weights=[2, 1, 1]))
    for path in weights[0]:
        np.testing.assert_allclose(uniform[path], sum(w[path] for w in weights) / 3, atol=1e-6)
        expected = (2 * weights[0][path] + weights[1][path] + weights[2][path]) / 4
        np.testing.assert_allclose(weighted[path], expected, atol=1e-6)


def test_interpolation_toward_a_base(checkpoints):
    paths, weights = checkpoints
    half = merged_weights(interpolate(paths[1], paths[0], alpha=0.25))
    for path in weights[0]:
        np.testing.assert_allclose(half[path], 0.75 * weights[0][path] + 0.25 * weights[1][path], atol=1e-6)


def test_cli_merge(checkpoints, tmp_path):
    paths, weights = checkpoints
    out = str(tmp_path / "merged")
    assert main(["merge", *paths[:2], "--weights", "1,3", "--out", out]) == 0
    import keras_gemma2

    merged = merged_weights(keras_gemma2.from_preset(out))
    for path in weights[0]:
        np.testing.assert_allclose(merged[path], 0.25 * weights[0][path] + 0.75 * weights[1][path], atol=1e-6)


def test_different_architectures_are_refused(checkpoints, tmp_path):
    paths, _ = checkpoints
    other = str(tmp_path / "other")
    Gemma2CausalLM(Gemma2Backbone(TINY.replace(num_layers=2))).save_to_preset(other)
    with pytest.raises(ValueError, match=r"architecture differs .*num_layers: 3 vs 2"):
        average_checkpoints([paths[0], other])
    with pytest.raises(ValueError, match="architecture differs"):
        interpolate(paths[0], other, alpha=0.5)
    with pytest.raises(ValueError, match="Got 1 weights for 2 checkpoints"):
        average_checkpoints(paths[:2], weights=[1])
    with pytest.raises(ValueError, match="non-negative"):
        average_checkpoints(paths[:2], weights=[1, -1])


@pytest.mark.parametrize("weights, error, message", [
    ("1,3", TypeError, r"weights must be a list of numbers, one per preset, got '1,3'"),
    (["1", "3"], TypeError, r"weights must be numbers, got '1' \(a str\)"),
    ([1, True], TypeError, r"weights must be numbers, got True"),
    ([1, float("nan")], ValueError, r"Merge weights must be finite and non-negative"),
    ([1, float("inf")], ValueError, r"Merge weights must be finite"),
    ([0, 0], ValueError, r"with a positive sum"),
    ([1, 2, 3], ValueError, r"Got 3 weights for 2 checkpoints \(pass one weight per preset\)"),
])
def test_bad_merge_weights_name_the_argument(checkpoints, weights, error, message):
    paths, _ = checkpoints
    with pytest.raises(error, match=message):
        average_checkpoints(paths[:2], weights=weights)


def test_bad_presets_and_alpha_name_the_argument(checkpoints):
    paths, _ = checkpoints
    with pytest.raises(TypeError, match=r"presets must be a list of presets, got the single str"):
        average_checkpoints(paths[0])
    for alpha in (float("nan"), float("inf"), "0.5", None, True):
        with pytest.raises(ValueError, match=r"alpha must be a finite number, got"):
            interpolate(paths[1], paths[0], alpha=alpha)
    # Outside [0, 1] extrapolates (allowed): base + 1.5 * (preset - base).
    weights = merged_weights(interpolate(paths[1], paths[0], alpha=1.5))
    reference = merged_weights(interpolate(paths[1], paths[0], alpha=1.0))
    base = merged_weights(interpolate(paths[1], paths[0], alpha=0.0))
    for path, value in weights.items():
        np.testing.assert_allclose(value, base[path] + 1.5 * (reference[path] - base[path]), atol=1e-5)
