"""The wire protocol: float16 deltas keep small and large updates."""

from __future__ import annotations

import numpy as np
import pytest

from fedlsc_flwr.wire import decode_update, encode_update


@pytest.mark.parametrize("size", [1e-7, 1e-4, 3e-2, 1e3])
def test_float16_delta_keeps_the_update_norm_at_any_scale(size):
    rng = np.random.default_rng(0)
    sent = rng.normal(size=4096).astype(np.float32)
    delta = (size * rng.normal(size=4096)).astype(np.float32)
    local = sent + delta
    true = local.astype(np.float64) - sent  # what the site really moved, in float32 weights
    encoded, exponent = encode_update(local, sent, "float16")
    assert encoded.dtype == np.float16 and np.isfinite(encoded).all()
    decoded = decode_update(encoded, sent, exponent).astype(np.float64) - sent
    # float16 keeps ~11 bits: an error below 0.1 % of the update's norm, every element
    # within 2^-10 of the largest (plus the float32 rounding of the weights themselves)
    assert np.linalg.norm(decoded - true) < 1e-3 * np.linalg.norm(true)
    assert np.abs(decoded - true).max() <= 2 ** -10 * np.abs(true).max() + \
        np.spacing(np.abs(sent).max())


def test_unscaled_float16_loses_tiny_updates_which_is_why_they_are_scaled():
    rng = np.random.default_rng(1)
    delta = 1e-7 * rng.normal(size=4096)
    error = np.linalg.norm(delta.astype(np.float16).astype(np.float64) - delta)
    assert error / np.linalg.norm(delta) > 0.1  # the failure the scaling removes (~17 %)


def test_float32_and_integer_tensors_go_as_they_are():
    w = np.arange(6, dtype=np.float32)
    out, exponent = encode_update(w, w - 1, "float32")
    assert out is w and exponent == 0
    counter = np.array(7, dtype=np.int64)
    out, exponent = encode_update(counter, np.array(3, dtype=np.int64), "float16")
    assert out is counter and exponent == 0


def test_zero_and_non_finite_deltas():
    w = np.ones(5, np.float32)
    out, exponent = encode_update(w, w, "float16")
    assert exponent == 0 and not out.any()
    bad = w.copy()
    bad[2] = np.nan
    out, exponent = encode_update(bad, w, "float16")
    assert exponent == 0 and np.isnan(out[2])  # refused by the server's NaN check
