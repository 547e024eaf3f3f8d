"""U-Net shape, residual and size tests (no torch needed).

Random initialisation compiles one PRNG program per parameter shape, which is
slow on a busy CPU: one small model is built per module and reused, other
variants are built abstractly (nnx.eval_shape) and given its parameters.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efiqa_jax.models.unet import UNet, num_params
from efiqa_jax.teacher import inference


def _x(shape, seed=0):
  return jax.random.uniform(jax.random.key(seed), shape, jnp.float32)


def _like(src: UNet, **kw) -> UNet:
  """A UNet built abstractly with `kw`, holding copies of src's parameters."""
  cfg = dict(in_channels=src.in_channels, out_channels=src.out_channels,
             base_channels=src.base_channels, residual=src.residual)
  cfg.update(kw)
  m = nnx.eval_shape(lambda: UNet(**cfg, rngs=nnx.Rngs(0)))
  nnx.update(m, jax.tree.map(jnp.copy, nnx.state(src, nnx.Param)))
  return m


def fast_rngs(seed: int = 0) -> nnx.Rngs:
  # The 'rbg' PRNG compiles ~5x faster than threefry on CPU; the values do not
  # matter here, only that they are random.
  return nnx.Rngs(jax.random.key(seed, impl="rbg"))


@pytest.fixture(scope="module")
def small():
  return UNet(3, 3, base_channels=4, rngs=fast_rngs())


def test_shapes_and_body(small):
  m = small
  x = _x((2, 32, 48, 3))
  # One jit for all three outputs: eager NNX dispatch is slow on a busy CPU.
  y, f, a = nnx.jit(lambda m, x: (m(x), m.body(x),
                                  inference.anomaly(m, x)))(m, x)
  assert y.shape == f.shape == (2, 32, 48, 3)
  assert float(jnp.abs(f).max()) > 0
  np.testing.assert_allclose(np.asarray(y), np.asarray(x + f), atol=1e-6)
  assert a.shape == (2, 32, 48)
  np.testing.assert_allclose(np.asarray(a), np.abs(np.asarray(f)).mean(-1),
                             atol=1e-6)
  plain = nnx.eval_shape(
      lambda: UNet(6, 3, base_channels=4, residual=False, rngs=nnx.Rngs(1)))
  assert nnx.eval_shape(lambda m, x: m(x), plain,
                        _x((1, 16, 16, 6))).shape == (1, 16, 16, 3)


def test_residual_identity_when_body_is_zero(small):
  m = _like(small)
  m.outconv.kernel[...] = jnp.zeros_like(m.outconv.kernel[...])
  m.outconv.bias[...] = jnp.zeros_like(m.outconv.bias[...])
  x = _x((1, 32, 32, 3), seed=3)
  y, a = nnx.jit(lambda m, x: (m(x), inference.anomaly(m, x)))(m, x)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
  assert float(jnp.abs(a).max()) == 0.0


def test_param_count_matches_reference():
  # 31,031,875 = torch RefUNetRes(3, 3, 64) parameter count (checked against
  # efiqa_jax/reference/unet.py, counting each duplicated tensor once).
  m = nnx.eval_shape(lambda: UNet(3, 3, 64, rngs=nnx.Rngs(0)))
  assert num_params(m) == 31_031_875

  def count(cin, cout, b):  # closed form from the layer list
    blk = lambda i, o: 9 * i * o + o + 9 * o * o + o
    up = lambda i, o: 4 * i * o + o
    enc = blk(cin, b) + blk(b, 2 * b) + blk(2 * b, 4 * b) + blk(4 * b, 8 * b)
    enc += blk(8 * b, 16 * b)
    dec = sum(up(2 * c, c) + blk(2 * c, c) for c in (8 * b, 4 * b, 2 * b, b))
    return enc + dec + b * cout + cout

  assert count(3, 3, 64) == 31_031_875
  m8 = nnx.eval_shape(lambda: UNet(6, 3, 8, residual=False, rngs=nnx.Rngs(0)))
  assert num_params(m8) == count(6, 3, 8)


def test_bf16_compute_float32_params(small):
  m16 = _like(small, dtype=jnp.bfloat16)
  for p in jax.tree.leaves(nnx.state(m16, nnx.Param)):
    assert p.dtype == jnp.float32
  x = _x((1, 32, 32, 3))
  body = nnx.jit(lambda m, x: m.body(x))
  f16, f32 = body(m16, x), body(small, x)
  assert f16.dtype == jnp.bfloat16 and f32.dtype == jnp.float32
  err = float(jnp.abs(f16.astype(jnp.float32) - f32).max())
  scale = float(jnp.abs(f32).max())
  assert 0 < scale and err <= 0.05 * scale + 1e-3, (err, scale)
  # The skip path keeps the input precision.
  assert nnx.eval_shape(lambda m, x: m(x), m16, x).dtype == jnp.float32


def test_bad_input_errors(small):
  fwd = lambda x: nnx.eval_shape(lambda m, x: m(x), small, x)
  with pytest.raises(ValueError, match="multiples of 16"):
    fwd(_x((1, 24, 32, 3)))
  with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
    fwd(_x((1, 32, 32, 1)))
  with pytest.raises(ValueError, match="in_channels == out_channels"):
    UNet(6, 3, rngs=nnx.Rngs(0))


def test_checkpoint_roundtrip_and_strict_sidecar(small, tmp_path):
  import json
  from efiqa_jax import checkpoints
  out = checkpoints.save_model(tmp_path / "m", small, {"note": "test"})
  m, meta = checkpoints.load_unet_checkpoint(out, dtype=jnp.bfloat16)
  assert meta["note"] == "test" and meta["kwargs"]["base_channels"] == 4
  assert m.dtype == jnp.bfloat16
  for a, b in zip(jax.tree.leaves(nnx.state(m, nnx.Param)),
                  jax.tree.leaves(nnx.state(small, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(FileExistsError):
    checkpoints.save_model(out, small)
  with pytest.raises(ValueError, match="architecture 'rrwnet'"):
    checkpoints.load_model(out, architecture="rrwnet")
  side = out / "efiqa.json"
  cfg = json.loads(side.read_text())
  cfg["kwargs"]["base_channels"] = 8
  side.write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match="shape mismatches"):
    checkpoints.load_model(out)


def test_kernels_and_accelerator_paths_are_the_same_function(monkeypatch):
  """The U-Net with its kernels (XLA:CPU: custom gradients, Winograd on the
  deep levels, base 16 reaching 256 channels), with the accelerator
  dispatch (plain 3x3 convs, the other fast forms) and with kernels off
  (plain lax ops and XLA's gradients): one function, forward and
  gradients."""
  from efiqa_jax import kernels  # pylint: disable=g-import-not-at-top
  from efiqa_jax.kernels import conv, switch  # pylint: disable=g-import-not-at-top
  model = UNet(3, 3, base_channels=16, rngs=fast_rngs(3))
  graphdef, state = nnx.split(model)
  x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))

  def run():
    def loss(s, x):
      return jnp.mean(nnx.merge(graphdef, s)(x) ** 2)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(state, x)

  want_val, (want_gs, want_gx) = run()
  with kernels.disabled():
    plain = run()
  monkeypatch.setattr(switch, "backend", lambda: "gpu")

  def not_here(*a):
    raise AssertionError("the XLA:CPU conv ran off CPU")

  monkeypatch.setattr(conv, "conv2d_same_cpu", not_here)
  for val, (gs, gx) in (plain, run()):
    np.testing.assert_allclose(val, want_val, rtol=1e-5)
    np.testing.assert_allclose(gx, want_gx, rtol=1e-4, atol=1e-9)
    for a, b in zip(jax.tree.leaves(gs), jax.tree.leaves(want_gs)):
      np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-7)
