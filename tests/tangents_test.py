"""Tests of `keras_fwdgrad.tangents`: the compact tangent types equal the
dense directions they stand for, and the scheduling helper leaves the
random words unchanged."""

import numpy as np
import pytest
import tensorflow as tf

from keras_fwdgrad import backend
from keras_fwdgrad import directions
from keras_fwdgrad import tangents
from tests.conftest import MODES


def _run(mode, fn):
    return backend.run(fn, mode)


def test_factored_is_the_outer_product_of_its_factors():
    rng = np.random.default_rng(0)
    u = rng.normal(size=(3, 4)).astype("float32")
    w = rng.normal(size=(5,)).astype("float32")
    t = tangents.Factored(tf.constant(u), tf.constant(w))
    assert t.shape == (3, 4, 5)
    expected = u[..., None] * w
    np.testing.assert_allclose(tangents.to_dense(t), expected, rtol=1e-6)
    np.testing.assert_allclose(tangents.to_dense(t, scale=-2.5), -2.5 * expected, rtol=1e-6)
    assert tangents.cast(t, "float16").dtype == "float16"


def test_packed_signs_are_the_bits_of_their_words():
    # Word 0b...0101 sets components 0 and 2 of the flattened variable.
    words = tf.constant([0b0101, 0xFFFFFFFF], tf.uint32)
    t = tangents.PackedSigns(words, (5, 7))
    dense = np.asarray(tangents.to_dense(t)).ravel()
    assert dense.shape == (35,)
    np.testing.assert_array_equal(dense[:4], [1.0, -1.0, 1.0, -1.0])
    np.testing.assert_array_equal(dense[32:], [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(np.asarray(tangents.to_dense(t, scale=0.5)).ravel(), 0.5 * dense)
    np.testing.assert_array_equal(tangents.unpack_signs(t), tangents.to_dense(t))


def test_dense_tangent_is_scaled_in_its_own_dtype():
    v = tf.constant([1.0, -2.0], tf.float16)
    out = tangents.to_dense(v, scale=tf.constant(3.0, tf.float32))
    assert out.dtype == tf.float16
    np.testing.assert_array_equal(out, [3.0, -6.0])
    assert tangents.to_dense(v) is v


@pytest.mark.parametrize("mode", MODES)
def test_words_computed_after_a_tensor_are_unchanged(mode):
    """The scheduling dependency adds zero: the words come back bit for bit
    whatever the tensor holds (NaN and infinities included)."""
    words = directions.random_bits(5, tf.constant([1, 2]))
    tensor = tf.constant([[np.nan, np.inf], [-np.inf, 3.0]])
    out = _run(mode, lambda: tangents.computed_after(words, tensor))
    assert out.dtype == tf.uint32
    np.testing.assert_array_equal(out, words)
