"""The vessel segmenter's fast paths equal what they replace (issue 6)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efiqa_jax import vessels


def test_masked_median_is_nanmedian_bit_for_bit():
  rng = np.random.default_rng(0)
  f = jax.jit(vessels.masked_median_nonneg)
  for t in range(12):
    n = int(rng.integers(1, 2000))
    x = (np.abs(rng.standard_normal((3, n))) *
         10 ** rng.uniform(-6, 2)).astype(np.float32)
    if t % 3 == 0:
      x = np.round(x, 1)  # ties
    if t % 4 == 0:
      x[:, : n // 2] = 0
    valid = rng.random((3, n)) < rng.uniform(0.05, 1)
    if t % 5 == 0:
      valid[0] = False  # an empty row gives 0
    want = np.nan_to_num(np.asarray(jnp.nanmedian(
        jnp.where(valid, x, jnp.nan), axis=1)), nan=0.0)
    np.testing.assert_array_equal(np.asarray(f(x, valid)), want)


@pytest.mark.parametrize("hi,ho", [(512, 128), (512, 256), (256, 512),
                                   (128, 512), (64, 16), (16, 64),
                                   (300, 77), (584, 1024)])
def test_banded_resize_matches_jax_image_resize(hi, ho):
  x = np.random.default_rng(hi + ho).random((2, hi, 2 * hi)).astype(np.float32)
  want = jax.image.resize(x, (2, ho, 2 * ho), "linear", antialias=True)
  got = jax.jit(lambda a: vessels._resize(a, ho, 2 * ho))(x)  # pylint: disable=protected-access
  # float32 summation order only (measured <= 1.8e-7 for values in [0, 1]).
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=5e-7)


def test_separable_filter_pads_once_same_as_per_pass():
  """`_separable` (one edge padding on both axes, valid passes) gives the
  two passes with their own edge padding bit for bit: padding along one
  axis commutes with filtering along the other."""
  conv = vessels._conv1d_valid  # pylint: disable=protected-access

  def padded_pass(a, k, axis):  # edge-pad this axis only, then filter
    half = (k.shape[0] - 1) // 2
    pad = [(0, 0)] * 3
    pad[axis] = (half, half)
    return conv(jnp.pad(a, pad, mode="edge"), k, axis)

  x = np.random.default_rng(3).random((2, 37, 53)).astype(np.float32)
  g, g1, g2 = vessels._gauss_kernels(1.5)  # pylint: disable=protected-access
  for kr, kc in ((g, g), (g1, g2), (g2, g1)):
    want = jax.jit(lambda a, kr=kr, kc=kc: padded_pass(
        padded_pass(a, kr, 1), kc, 2))(x)
    got = jax.jit(lambda a, kr=kr, kc=kc: vessels._separable(a, kr, kc))(x)  # pylint: disable=protected-access
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_batch_maps_equal_one_photograph_at_a_time():
  """On CPU the jitted segmenter runs the batch one photograph at a time
  inside the call (`xla_cpu.map_examples`); the maps equal single-photograph
  calls, and the tuple form of map_examples keeps every output."""
  from efiqa_jax import synth, xla_cpu  # pylint: disable=g-import-not-at-top
  imgs = np.stack([synth.generate(s, 128).image for s in range(3)])
  fov = np.ones(imgs.shape[:3], bool)
  batch = np.asarray(vessels.vessel_probability(imgs, fov))
  for k in range(3):
    np.testing.assert_array_equal(
        batch[k], np.asarray(vessels.vessel_probability(imgs[k:k + 1],
                                                        fov[k:k + 1]))[0])
  x = jnp.asarray(imgs, jnp.float32)
  t = jax.jit(lambda a: xla_cpu.map_examples(
      lambda v: (v.sum(axis=(1, 2)), v * 2), a))(x)
  assert t[0].shape == (3, 3) and t[1].shape == imgs.shape
  np.testing.assert_allclose(np.asarray(t[0]), imgs.sum(axis=(1, 2)),
                             rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(t[1]), 2 * np.asarray(x))
