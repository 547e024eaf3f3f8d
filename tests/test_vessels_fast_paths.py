"""The vessel segmenter's fast paths equal what they replace (issue 6); its
median and resize are tested in test_kernels.py."""
import jax
import jax.numpy as jnp
import numpy as np

from efiqa_jax import vessels


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
  inside the call (`kernels.xla_cpu.map_examples`); the maps equal
  single-photograph calls, and the tuple form of map_examples keeps every
  output."""
  from efiqa_jax import synth  # pylint: disable=g-import-not-at-top
  from efiqa_jax.kernels import xla_cpu  # pylint: disable=g-import-not-at-top
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
