"""Packed int4 format: hand-worked bytes, round trips (jnp and NumPy agree), bad input."""
import jax.numpy as jnp
import numpy as np
import pytest

from resq_jax.formats.packing import pack_int4, pack_int4_np, signed_shift, unpack_int4, unpack_int4_np


def test_hand_worked_bytes():
    # [1, -1] -> low nibble 0x1, high nibble 0xF -> 0xF1 = -15 as int8; [-8, 7] -> 0x78 = 120
    q = np.array([[1, -1, -8, 7, 0, 0]], np.int8)
    want = np.array([[np.uint8(0xF1).view(np.int8), 0x78, 0]], np.int8)
    np.testing.assert_array_equal(pack_int4_np(q), want)
    np.testing.assert_array_equal(np.asarray(pack_int4(jnp.asarray(q))), want)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_round_trip_every_value(axis):
    rng = np.random.default_rng(0)
    q = rng.integers(-8, 8, size=(6, 10, 4)).astype(np.int8)
    p = pack_int4_np(q, axis)
    assert p.shape[axis] == q.shape[axis] // 2 and p.dtype == np.int8
    np.testing.assert_array_equal(np.asarray(pack_int4(jnp.asarray(q), axis)), p)
    np.testing.assert_array_equal(unpack_int4_np(p, axis), q)
    np.testing.assert_array_equal(np.asarray(unpack_int4(jnp.asarray(p), axis)), q)


def test_all_256_bytes_unpack_and_repack():
    b = np.arange(-128, 128, dtype=np.int8)
    q = unpack_int4_np(b)
    assert q.min() == -8 and q.max() == 7
    np.testing.assert_array_equal(pack_int4_np(q), b)


def test_signed_shift_preserves_values():
    q = jnp.asarray([0, 7, 15], jnp.uint8)
    s, z = signed_shift(q, jnp.float32(5.0), 4)
    np.testing.assert_array_equal(np.asarray(s), [-8, -1, 7])
    np.testing.assert_array_equal(np.asarray(s, np.float32) - np.asarray(z), np.asarray(q, np.float32) - 5.0)


def test_bad_input():
    with pytest.raises(ValueError, match="even length"):
        pack_int4_np(np.zeros((3,), np.int8))
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4_np(np.array([8, 0]))
