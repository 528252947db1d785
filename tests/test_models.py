"""metarep.core.model: the linear network's initialisation and prediction; its parameter files
(metarep.run.inputs.load_params)."""

from __future__ import annotations

import numpy as np
import pytest

from metarep.core.model import LinearParams, init_linear, predict
from metarep.errors import ConfigError
from metarep.run.inputs import load_params


def test_init_linear_scale_zero_head_dtype_and_seed():
    """Entries N(0, s^2 / d): the mean squared column norm is s^2 (z-test over d k' entries,
    Var(x^2) = 2 (s^2/d)^2)."""
    d, width, scale = 40, 300, 0.7
    params = init_linear(d, width, scale, np.random.default_rng(0))
    assert params.B.shape == (d, width) and params.width == width
    np.testing.assert_array_equal(params.w, np.zeros(width))
    entries = params.B.ravel()
    variance = scale**2 / d
    z = (np.mean(entries**2) - variance) / (np.sqrt(2 / entries.size) * variance)
    assert abs(z) < 5
    z_mean = np.mean(entries) / np.sqrt(variance / entries.size)
    assert abs(z_mean) < 5
    again = init_linear(d, width, scale, np.random.default_rng(0), "float32")
    assert again.B.dtype == np.float32 and again.w.dtype == np.float32
    np.testing.assert_array_equal(again.B, params.B.astype(np.float32))


def test_predict_and_finiteness():
    rng = np.random.default_rng(1)
    params = LinearParams(rng.standard_normal((4, 3)), rng.standard_normal(3))
    X = rng.standard_normal((5, 6, 4))
    expected = np.array([[x @ params.B @ params.w for x in task] for task in X])
    np.testing.assert_allclose(predict(params, X), expected, rtol=1e-13)
    assert params.is_finite()
    assert not LinearParams(params.B, np.array([0.0, np.nan, 1.0])).is_finite()
    assert not LinearParams(np.full((4, 3), np.inf), params.w).is_finite()
    assert params.astype(np.float32).B.dtype == np.float32


def test_load_params_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    B, w = rng.standard_normal((6, 9)), rng.standard_normal(9)
    np.savez(tmp_path / "init.npz", B=B, w=w)
    params = load_params(tmp_path / "init.npz", 6)
    np.testing.assert_array_equal(params.B, B)
    np.testing.assert_array_equal(params.w, w)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"B": np.zeros((6, 3))}, "no array 'w'"),
        ({"w": np.zeros(3)}, "no array 'B'"),
        ({"B": np.zeros((5, 3)), "w": np.zeros(3)}, "d = 6"),
        ({"B": np.zeros(6), "w": np.zeros(1)}, "B must have shape"),
        ({"B": np.zeros((6, 0)), "w": np.zeros(0)}, "k' >= 1"),
        ({"B": np.zeros((6, 3)), "w": np.zeros(4)}, "w must have shape"),
        ({"B": np.zeros((6, 3)), "w": np.zeros((3, 1))}, "w must have shape"),
        ({"B": np.full((6, 3), np.nan), "w": np.zeros(3)}, "finite"),
    ],
)
def test_load_params_rejects_bad_files(tmp_path, arrays, message):
    np.savez(tmp_path / "init.npz", **arrays)
    with pytest.raises(ConfigError) as info:
        load_params(tmp_path / "init.npz", 6)
    assert info.value.key == "model.init_from"
    assert message in str(info.value)


def test_load_params_missing_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_params(tmp_path / "none.npz", 6)
    assert info.value.key == "model.init_from" and "not found" in str(info.value)
