"""Tests of the direction distributions: shapes, determinism and moments."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_fwdgrad import directions

SHAPES = [(3,), (2, 2)]
N_SAMPLES = 4000


def _draw(direction, n, shapes=SHAPES):
    sample = tf.function(
        lambda s: tf.concat([tf.reshape(t, [-1]) for t in direction.sample(shapes, s)], 0)
    )
    return np.stack([sample(tf.constant([5, i], tf.int64)).numpy() for i in range(n)])


FAMILIES = ["gaussian", "rademacher", "lowrank_gaussian", "lowrank_rademacher"]


def test_available_lists_shipped_families():
    assert set(FAMILIES) <= set(directions.available())
    assert directions.available() == sorted(directions.available())


@pytest.mark.parametrize("name", FAMILIES)
def test_sample_shapes_dtype_and_determinism(name):
    d = directions.get(name)
    shapes = [(3, 5), (5,), (1,), (2, 3, 4)]
    a = d.sample(shapes, tf.constant([1, 2]))
    b = d.sample(shapes, tf.constant([1, 2]))
    c = d.sample(shapes, tf.constant([1, 3]))
    assert [tuple(t.shape) for t in a] == shapes
    assert all(t.dtype == tf.float32 for t in a)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, z) for x, z in zip(a, c))


@pytest.mark.parametrize(
    "name, fourth_moment, off_diagonal_variance",
    [
        ("gaussian", 3.0, 1.0),
        ("rademacher", 1.0, 1.0),
        ("lowrank_gaussian", 9.0, 3.0),
        ("lowrank_rademacher", 1.0, 1.0),
    ],
)
def test_moments_mean_zero_identity_covariance(name, fourth_moment, off_diagonal_variance):
    """Probabilistic, fixed seed: E[v] = 0 and E[v vᵀ] = I.

    Each bound is 5 standard errors of the estimate: for a mean, Var(v_i) = 1;
    for an off-diagonal entry, Var(v_i v_j) = E[v_i² v_j²], which is 1 for
    independent components and, for the low-rank families, at most
    E[u⁴] E[w²]² (3 for Gaussian factors: `v_ij v_il = u_i² w_j w_l`); for
    a diagonal entry, Var(v_i²) = E[v⁴] − 1 (2 for Gaussian, 0 for
    Rademacher, 9 − 1 = 8 for a product of two Gaussians).
    """
    v = _draw(directions.get(name), N_SAMPLES)
    n = N_SAMPLES
    mean = v.mean(0)
    cov = v.T @ v / n
    assert np.all(np.abs(mean) <= 5 / math.sqrt(n)), mean
    off = cov[~np.eye(len(cov), dtype=bool)]
    assert np.all(np.abs(off) <= 5 * math.sqrt(off_diagonal_variance / n)), off
    diag_bound = 5 * math.sqrt((fourth_moment - 1) / n) + 1e-6
    assert np.all(np.abs(np.diag(cov) - 1) <= diag_bound), np.diag(cov)


def test_moment_check_detects_a_wrong_scale():
    """The moment bounds above are tight enough to reject E[vvᵀ] = 1.1² I."""

    class Scaled(directions.Direction):
        def sample(self, shapes, seed, dtype="float32"):
            return [1.1 * t for t in directions.Gaussian().sample(shapes, seed)]

    v = _draw(Scaled(), N_SAMPLES)
    diag = np.diag(v.T @ v / N_SAMPLES)
    assert np.any(np.abs(diag - 1) > 5 * math.sqrt(2 / N_SAMPLES))


@pytest.mark.parametrize("name", FAMILIES)
def test_structured_sample_is_the_same_direction(name):
    """`sample_structured` draws the direction `sample` returns; the
    low-rank families keep kernels as rank-one `Factored` pairs."""
    d = directions.get(name)
    shapes = [(6, 4), (4,), (3, 3, 2, 5)]
    seed = tf.constant([8, 9])
    dense = d.sample(shapes, seed)
    structured = d.sample_structured(shapes, seed)
    for a, b in zip(dense, structured):
        np.testing.assert_array_equal(a, directions.to_dense(b))
    factored = [isinstance(t, directions.Factored) for t in structured]
    if name.startswith("lowrank"):
        assert factored == [True, False, True]
        assert structured[2].u.shape == (3, 3, 2) and structured[2].w.shape == (5,)
        assert np.linalg.matrix_rank(dense[0].numpy()) == 1
    else:
        assert not any(factored)
    if name == "rademacher":
        assert all(isinstance(t, directions.PackedSigns) for t in structured)
        # ceil(n / 32) words per variable.
        assert [int(t.words.shape[0]) for t in structured] == [1, 1, 3]


def test_packed_signs_scale_exactly():
    """`PackedSigns.dense(scale)` is `scale · v` bit for bit (it selects
    `±scale`), for a scalar tensor scale and after a cast."""
    shapes = [(70,), (33, 3)]
    seed = tf.constant([2, 5])
    d = directions.Rademacher()
    dense = d.sample(shapes, seed)
    for packed, v in zip(d.sample_structured(shapes, seed), dense):
        scale = tf.constant(-0.3711, tf.float32)
        np.testing.assert_array_equal(packed.dense(scale), scale * v)
        half = packed.cast("float16")
        assert half.dtype == tf.float16 and half.shape == packed.shape
        np.testing.assert_array_equal(half.dense(), tf.cast(v, tf.float16))


def test_gaussian_is_standard_normal():
    """Probabilistic, fixed seed: over 10⁶ draws the empirical CDF of the
    Gaussian family at z = 0, ±1, ±2, ±3 is within 5 standard errors,
    sqrt(p (1 − p) / n), of Φ(z) (the quantization adds at most 2⁻¹⁶,
    under a tenth of the smallest of these bounds), and the fourth moment within 5
    standard errors, sqrt((E[z⁸] − 9) / n) = sqrt(96 / n), of 3."""
    n = 1_000_000
    z = directions.Gaussian().sample([(n,)], tf.constant([4, 2]))[0].numpy()
    z = z.astype("float64")
    for point in (-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0):
        p = 0.5 * (1 + math.erf(point / math.sqrt(2)))
        assert abs(np.mean(z <= point) - p) <= 5 * math.sqrt(p * (1 - p) / n), point
    assert abs(np.mean(z**4) - 3) <= 5 * math.sqrt(96 / n)


def test_gaussian_levels_are_a_unit_variance_quantized_normal():
    """The 2¹⁶ levels: ascending, exactly antisymmetric (so mean 0), mean
    square 1 to float64 rounding (1e-12) and to float32 rounding (1e-6)
    once cast as the sampler uses them, CDF within 2⁻¹⁶ of Φ on a grid of
    4,001 points in [−5, 5], fourth moment within 10⁻³ of 3."""
    levels = directions.gaussian_levels()
    assert levels.shape == (2**16,)
    assert np.all(np.diff(levels) > 0)
    np.testing.assert_array_equal(levels, -levels[::-1])
    assert abs(np.mean(levels**2) - 1) <= 1e-12
    as_float32 = levels.astype("float32").astype("float64")
    np.testing.assert_array_equal(as_float32, -as_float32[::-1])
    assert abs(np.mean(as_float32**2) - 1) <= 1e-6
    grid = np.linspace(-5.0, 5.0, 4001)
    cdf = np.searchsorted(levels, grid, side="right") / 2**16
    normal = np.array([0.5 * (1 + math.erf(z / math.sqrt(2))) for z in grid])
    assert np.max(np.abs(cdf - normal)) <= 2**-16
    assert abs(np.mean(levels**4) - 3) <= 1e-3


def test_gaussian_reads_two_levels_per_random_word():
    """Component 2i of a variable is the level indexed by the low 16 bits of
    its i-th random word, component 2i + 1 by the high 16 bits (checked
    exactly on an odd size, for the second variable of a direction)."""
    seed = tf.constant([6, 7], tf.int64)
    v = directions.Gaussian().sample([(4,), (7,)], seed)[1].numpy()
    words = directions.random_bits(4, tf.random.experimental.stateless_fold_in(seed, 1)).numpy()
    index = np.stack([words & 0xFFFF, words >> 16], axis=1).reshape(-1)[:7]
    expected = directions.gaussian_levels()[index].astype("float32")
    np.testing.assert_array_equal(v, expected)


def test_quantized_normal_is_the_gaussian_family_in_any_shape():
    """`quantized_normal` (activity perturbation's tangents) draws exactly
    the Gaussian family's levels for a static shape, and in a graph for a
    shape known only when it runs (a batch of unknown size), the same
    numbers as for that shape given statically."""
    seed = tf.constant([6, 7], tf.int64)
    v = directions.quantized_normal((3, 5), seed)
    assert v.shape == (3, 5) and v.dtype == tf.float32
    words = directions.random_bits(8, seed).numpy()
    index = np.stack([words & 0xFFFF, words >> 16], axis=1).reshape(-1)[:15]
    np.testing.assert_array_equal(
        v.numpy().ravel(), directions.gaussian_levels()[index].astype("float32")
    )

    @tf.function(input_signature=[tf.TensorSpec([None, 5])])
    def dynamic(x):
        return directions.quantized_normal(tf.shape(x), seed, "float16")

    w = dynamic(tf.zeros((3, 5)))
    assert w.dtype == tf.float16
    np.testing.assert_array_equal(w.numpy(), v.numpy().astype("float16"))


def test_random_signs_unpack_the_words_as_packed_signs_do():
    """`random_signs` (the Rademacher family's activity tangents) gives
    bit `j` of word `i` as component `32 i + j` (+1 where set), for a
    static shape, in a graph for a shape known only when it runs, and
    under XLA."""
    seed = tf.constant([6, 7], tf.int64)
    v = directions.random_signs((3, 25), seed)
    assert v.shape == (3, 25) and v.dtype == tf.float32
    words = directions.random_bits(3, seed).numpy()
    bits = (words[:, None] >> np.arange(32, dtype="uint32")) & 1
    np.testing.assert_array_equal(v.numpy().ravel(), 2.0 * bits.ravel()[:75] - 1)

    @tf.function(input_signature=[tf.TensorSpec([None, 25])])
    def dynamic(x):
        return directions.random_signs(tf.shape(x), seed, "float16")

    w = dynamic(tf.zeros((3, 25)))
    assert w.dtype == tf.float16
    np.testing.assert_array_equal(w.numpy(), v.numpy().astype("float16"))
    assert directions.Rademacher().tangent((3, 25), seed).numpy().tolist() == v.numpy().tolist()

    # Under XLA, which unpacks the bits by another formula.
    @tf.function(jit_compile=True)
    def compiled(x):
        return directions.random_signs(tf.shape(x), seed)

    np.testing.assert_array_equal(compiled(tf.zeros((3, 25))).numpy(), v.numpy())


@pytest.mark.parametrize("name", FAMILIES)
def test_same_direction_with_and_without_xla(name):
    """A seed gives bit-identical directions eagerly, in a graph and under
    XLA (Philox bits, then exact integer and table operations)."""
    shapes = [(37, 5), (5,), (3, 3, 2, 4)]
    seed = tf.constant([11, 12], tf.int64)
    d = directions.get(name)
    fn = lambda: d.sample(shapes, seed)  # noqa: E731
    eager = fn()
    for compiled in (tf.function(fn)(), tf.function(fn, jit_compile=True)()):
        for a, b in zip(eager, compiled):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("mode", ["eager", "graph", "xla"])
def test_random_words_and_folded_seeds_are_tensorflows_philox(mode):
    """`random_bits` and `backend.fold_in` scramble the seed in a few ops
    of their own: they give TensorFlow's `stateless_uniform` and
    `stateless_fold_in` (`alg="philox"`) bit for bit, for 100 random
    `int64` seeds and the extreme ones, folding `int64` and `int32` data,
    in every mode."""
    from keras_fwdgrad import backend

    def ours(seed, i):
        return directions.random_bits(37, seed), backend.fold_in(seed, i), backend.fold_in(seed, 4)

    def tensorflows(seed, i):
        words = tf.random.stateless_uniform(
            [37], seed, minval=None, maxval=None, dtype=tf.int32, alg="philox"
        )
        fold = tf.random.experimental.stateless_fold_in
        return tf.bitcast(words, tf.uint32), fold(seed, i, "philox"), fold(seed, 4, "philox")

    if mode != "eager":
        ours = tf.function(ours, jit_compile=mode == "xla", autograph=False)
    rng = np.random.default_rng(0)
    seeds = list(rng.integers(-(2**63), 2**63 - 1, size=(100, 2), endpoint=True))
    seeds += [[0, 0], [-1, -1], [2**63 - 1, -(2**63)]]
    for k, seed in enumerate(seeds):
        seed, i = tf.constant(seed, tf.int64), tf.constant(k - 50, tf.int64)
        for a, b in zip(ours(seed, i), tensorflows(seed, i)):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_random_bits_are_uniform_and_distinct_per_seed():
    """Probabilistic, fixed seed: each of the 32 bit positions of 10⁵ words
    is set with frequency within 5 standard errors of 1/2, and two seeds
    give different words."""
    n = 100_000
    a = directions.random_bits(n, tf.constant([1, 2])).numpy()
    b = directions.random_bits(n, tf.constant([1, 3])).numpy()
    assert a.dtype == np.uint32
    bits = (a[:, None] >> np.arange(32, dtype=np.uint32)) & 1
    assert np.all(np.abs(bits.mean(0) - 0.5) <= 5 * 0.5 / math.sqrt(n))
    assert np.mean(a == b) < 1e-3


def test_rademacher_uses_every_bit_independently():
    """Probabilistic, fixed seed: over 320,000 signs (10,000 random words)
    the fraction of +1 at each of the 32 bit positions, and the correlation
    of neighbouring signs, are within 5 standard errors of 1/2 and 0."""
    n = 320_000
    v = directions.Rademacher().sample([(n,)], tf.constant([3, 4]))[0].numpy()
    assert set(np.unique(v)) == {-1.0, 1.0}
    per_bit = (v.reshape(-1, 32) > 0).mean(0)
    assert np.all(np.abs(per_bit - 0.5) <= 5 * 0.5 / math.sqrt(n / 32)), per_bit
    assert abs(np.mean(v[1:] * v[:-1])) <= 5 / math.sqrt(n)


def test_rademacher_handles_sizes_not_multiple_of_32():
    v = directions.Rademacher().sample([(7,), (3, 11)], tf.constant([0, 1]))
    assert [tuple(t.shape) for t in v] == [(7,), (3, 11)]


def test_get_errors():
    with pytest.raises(ValueError, match="`direction` must be one of"):
        directions.get("uniformish")
    with pytest.raises(TypeError, match="`direction` must be a string"):
        directions.get(3)


def test_register_custom_direction_and_round_trip():
    @directions.register("test_uniform")
    @keras.saving.register_keras_serializable(package="tests")
    class Uniform(directions.Direction):
        def __init__(self, scale=1.0):
            self.scale = scale

        def sample(self, shapes, seed, dtype="float32"):
            n = sum(math.prod(s) for s in shapes)
            a = math.sqrt(3.0) * self.scale
            flat = tf.random.stateless_uniform([n], seed, -a, a, dtype=dtype)
            return directions.split_flat(flat, shapes)

        def get_config(self):
            return {"scale": self.scale}

    assert "test_uniform" in directions.available()
    d = directions.get("test_uniform")
    assert isinstance(d, Uniform)
    restored = directions.get(keras.saving.serialize_keras_object(Uniform(2.0)))
    assert isinstance(restored, Uniform) and restored.scale == 2.0


def test_register_rejects_non_direction():
    with pytest.raises(TypeError, match="Direction"):
        directions.register("bad")(object)
    with pytest.raises(ValueError, match="`name`"):
        directions.register("")
