"""Adapters (linear / MLP / EFIQA-CP ModernHead64to16) and distillation
losses against hand-computed values."""
import math

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from efiqa_jax import checkpoints
from efiqa_jax.models import adapters
from efiqa_jax.student import losses


def sp(x):  # softplus by hand
  return math.log1p(math.exp(x))


def _n_params(m):
  return sum(int(np.prod(a.shape)) for a in
             jax.tree.leaves(nnx.state(m, nnx.Param)))


def test_linear_adapter_is_z_dot_w_plus_b():
  m = adapters.build_adapter("sc_linear", 3, seed=1)
  m.linear.kernel[...] = jnp.array([[1.0], [-2.0], [0.5]])
  m.linear.bias[...] = jnp.array([0.25])
  z = jnp.array([[[[1.0, 1.0, 2.0], [0.0, -1.0, 4.0]]]])  # (1, 1, 2, 3)
  out = np.asarray(m(z))
  # 1 - 2 + 1 + .25 = 0.25 ; 0 + 2 + 2 + .25 = 4.25
  np.testing.assert_allclose(out, [[[0.25, 4.25]]], atol=1e-6)
  assert _n_params(m) == 4


def test_mlp_adapter_shapes():
  m = adapters.build_adapter("mlp", 8, hidden=5)
  assert m(jnp.ones((2, 3, 4, 8))).shape == (2, 3, 4)
  assert _n_params(m) == 8 * 5 + 5 + 5 + 1


def test_modern_head_param_count_and_grid():
  # The EFIQA-CP configuration: D=1024, mid 512, mlp_ratio 1 -> 5.39 M.
  m = nnx.eval_shape(lambda: adapters.ModernHead64to16(1024, rngs=nnx.Rngs(0)))
  # stem LN 2048 + 1x1 524,800; 5 blocks x 552,448; 2 downsamples x
  # 1,050,112; head LN 1024 + 513.
  assert _n_params(m) == 2048 + 524800 + 5 * 552448 + 2 * 1050112 + 1537
  assert _n_params(m) == 5_390_849
  rates = [m.stages[str(s)][str(j)].drop_path_rate
           for s, d in enumerate((2, 2, 1)) for j in range(d)]
  np.testing.assert_allclose(rates, [0.033] * 2 + [0.066] * 2 + [0.1])
  assert m.output_grid(64, 64) == (16, 16)
  with pytest.raises(ValueError):
    m.output_grid(14, 14)


def test_modern_head_forward_and_drop_path():
  m = adapters.ModernHead64to16(8, mid_channels=16, rngs=nnx.Rngs(0))
  z = jax.random.normal(jax.random.key(0), (2, 16, 16, 8))
  out = m(z)
  assert out.shape == (2, 4, 4)
  np.testing.assert_array_equal(np.asarray(m(z)), np.asarray(out))  # det.
  train = m(z, key=jax.random.key(3))
  assert not np.allclose(np.asarray(train), np.asarray(out))
  # Layer scale starts at one.
  np.testing.assert_array_equal(np.asarray(m.stages["0"]["0"].gamma[...]),
                                np.ones(16))


def test_drop_path_scales_kept_samples():
  x = jnp.ones((1000, 2, 2, 1))
  y = np.asarray(adapters.drop_path(x, 0.25, jax.random.key(0)))
  kept = y[:, 0, 0, 0] > 0
  np.testing.assert_allclose(y[kept], 1 / 0.75, rtol=1e-6)
  assert 0.68 < kept.mean() < 0.82


def test_adapters_save_and_load(tmp_path):
  for name, kw in (("linear", {}), ("mlp", dict(hidden=4)),
                   ("modern_head_64to16", dict(mid_channels=8))):
    m = adapters.build_adapter(name, 6, seed=2, **kw)
    checkpoints.save_model(tmp_path / name, m)
    back, meta = checkpoints.load_model(tmp_path / name)
    assert type(back) is type(m) and meta["architecture"] == m.ARCH
    z = jax.random.normal(jax.random.key(1), (1, 8, 8, 6))
    np.testing.assert_array_equal(np.asarray(back(z)), np.asarray(m(z)))


def test_bce_pos_weight_hand_values():
  z = jnp.array([0.0, 2.0, -1.0])
  y = jnp.array([1.0, 0.0, 1.0])
  want = (20 * sp(0) + sp(2) + 20 * sp(1)) / 3
  np.testing.assert_allclose(float(losses.bce_pos_weight(z, y, 20.0)), want,
                             rtol=1e-6)
  # The mask drops the last element from the mean.
  want2 = (9.58 * sp(0) + sp(2)) / 2
  got2 = losses.bce_pos_weight(z, y, 9.58, mask=jnp.array([1, 1, 0]))
  np.testing.assert_allclose(float(got2), want2, rtol=1e-6)
  # pos_weight 1 is plain BCE.
  p = 1 / (1 + math.exp(-2.0))
  np.testing.assert_allclose(
      float(losses.bce_pos_weight(jnp.array([2.0]), jnp.array([0.0]))),
      -math.log(1 - p), rtol=1e-6)


def test_nnpu_hand_values():
  z = jnp.array([[2.0, -1.0], [0.0, 1.0]])
  y = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  rp_plus = (sp(-2) + sp(-1)) / 2
  rp_minus = (sp(2) + sp(1)) / 2
  ru_minus = (sp(-1) + sp(0)) / 2
  want = 0.05 * rp_plus + max(0.0, ru_minus - 0.05 * rp_minus)
  loss, valid = losses.nnpu(z, y, pi=0.05, beta=0.0)
  np.testing.assert_allclose(float(loss), want, rtol=1e-6)
  assert float(valid) == 1.0
  # The clamp: with pi = 0.5, ru - pi*rp_minus < beta = 0.2 -> beta wins.
  loss, _ = losses.nnpu(z, y, pi=0.5, beta=0.2)
  assert ru_minus - 0.5 * rp_minus < 0.2
  np.testing.assert_allclose(float(loss), 0.5 * rp_plus + 0.2, rtol=1e-6)
  # Masked pixels are neither P nor U.
  loss, _ = losses.nnpu(z, y, pi=0.05, mask=jnp.array([[1, 0], [1, 1]]))
  want3 = 0.05 * rp_plus + max(0.0, sp(0) - 0.05 * rp_minus)
  np.testing.assert_allclose(float(loss), want3, rtol=1e-6)


def test_nnpu_skips_batches_without_p_or_u():
  z = jnp.array([0.3, -0.2])
  for y in (jnp.zeros(2), jnp.ones(2)):
    loss, valid = losses.nnpu(z, y)
    assert float(loss) == 0.0 and float(valid) == 0.0
    g = jax.grad(lambda zz: losses.nnpu(zz, y)[0])(z)
    np.testing.assert_array_equal(np.asarray(g), 0.0)
  # 0/255 labels: > 0.5 is positive.
  _, valid = losses.nnpu(z, jnp.array([255.0, 0.0]))
  assert float(valid) == 1.0


def test_nnpu_pos_weight():
  z, y = jnp.array([2.0, -1.0]), jnp.array([1.0, 0.0])
  want = 3 * 0.05 * sp(-2) + max(0.0, sp(-1) - 0.05 * sp(2))
  loss, _ = losses.nnpu(z, y, pi=0.05, pos_weight=3.0)
  np.testing.assert_allclose(float(loss), want, rtol=1e-6)
