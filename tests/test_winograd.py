"""Winograd 3x3 convolution (efiqa_jax.kernels.winograd) and the XLA:CPU
conv's plan and custom gradient (efiqa_jax.kernels.conv) against
lax.conv_general_dilated and its autodiff, float32."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efiqa_jax.kernels import conv, winograd

# max |diff| / max |reference|; measured ~3e-7 (m = 2) and ~4e-6 (m = 4) on
# these shapes, forward and gradients.
TOL = {2: 1e-5, 4: 5e-5}
# (B, H, W, Cin, Cout): odd channels, sizes not multiples of the tile, 1 px.
SHAPES = [(1, 7, 9, 3, 5), (2, 13, 6, 17, 9), (1, 1, 1, 4, 3)]


def _direct(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=("NHWC", "HWIO",
                                                         "NHWC"))


def _data(shape, seed=0):
  b, h, w, ci, co = shape
  rng = np.random.RandomState(seed)
  x = jnp.asarray(rng.randn(b, h, w, ci).astype(np.float32))
  k = jnp.asarray(rng.randn(3, 3, ci, co).astype(np.float32) / np.sqrt(9 * ci))
  g = jnp.asarray(rng.randn(b, h, w, co).astype(np.float32))
  return x, k, g


def _rel(a, b):
  return float(jnp.abs(a - b).max() / jnp.abs(b).max())


@pytest.mark.parametrize("m", winograd.TILES)
@pytest.mark.parametrize("shape", SHAPES)
def test_conv3x3_matches_lax(shape, m):
  x, k, g = _data(shape)

  @jax.jit
  def run(x, k, g):
    v = winograd.input_transform(x, m)
    return (winograd.conv3x3(x, k, m), _direct(x, k),
            winograd.weight_grad(v, g, m),
            jax.vjp(lambda k_: _direct(x, k_), k)[1](g)[0],
            # The transforms' adjoints (used by the custom backward).
            winograd.input_transform_transpose(v, m, x.shape),
            jax.vjp(lambda x_: winograd.input_transform(x_, m), x)[1](v)[0])

  y, y_ref, dw, dw_ref, dx, dx_ref = run(x, k, g)
  assert _rel(y, y_ref) < TOL[m]
  assert _rel(dw, dw_ref) < TOL[m]
  assert _rel(dx, dx_ref) < 1e-6


def test_bad_tile_and_kernel():
  x, k, _ = _data((1, 4, 4, 2, 2))
  with pytest.raises(ValueError, match="tile m"):
    winograd.conv3x3(x, k, 3)
  with pytest.raises(ValueError, match="kernel"):
    winograd.conv3x3(x, k[:, :, :1], 2)


@pytest.mark.parametrize("shape,min_channels,dw_min_cin", [
    ((1, 32, 32, 33, 31), 1, 1),          # all Winograd, m = 4
    ((2, 13, 6, 17, 9), 1, 1),            # all Winograd, m = 2
    ((1, 32, 32, 33, 31), 10**9, 1),      # direct, Winograd weight grad
    ((1, 7, 9, 3, 5), 10**9, 10**9)])     # direct, per-tap weight grad
def test_conv2d_same_cpu_value_and_grad(monkeypatch, shape, min_channels,
                                       dw_min_cin):
  """Every path of conv.conv2d_same_cpu's plan (all Winograd; direct forward
  with Winograd weight gradient; all direct / per-tap) against lax's
  autodiff."""
  monkeypatch.setattr(conv, "WINOGRAD_MIN_CHANNELS", min_channels)
  monkeypatch.setattr(conv, "WINOGRAD_DW_MIN_CIN", dw_min_cin)
  x, k, g = _data(shape, seed=1)

  @jax.jit
  def run(x, k, g):
    y, vjp = jax.vjp(conv.conv2d_same_cpu, x, k)
    y_ref, vjp_ref = jax.vjp(_direct, x, k)
    return (y, *vjp(g)), (y_ref, *vjp_ref(g))

  for a, b in zip(*run(x, k, g)):
    assert _rel(a, b) < TOL[4]


def test_plan_on_unet_shapes():
  # batch 4, 256 px, base 64: shallow layers direct, deep ones Winograd.
  assert conv.conv_plan((4, 256, 256, 3), (3, 3, 3, 64)) == (None, None)
  assert conv.conv_plan((4, 256, 256, 64), (3, 3, 64, 64)) == (None, 4)
  assert conv.conv_plan((4, 64, 64, 256), (3, 3, 256, 256)) == (4, 4)
  assert conv.conv_plan((4, 16, 16, 1024), (3, 3, 1024, 1024)) == (2, 2)
  assert conv.conv_plan((4, 16, 16, 64), (1, 1, 64, 3)) == (None, None)
  assert conv.conv_plan((4, 64, 64, 256), (3, 3, 256, 256),
                        jnp.bfloat16) == (None, None)
