"""ViT encoder tests that run without torch: golden outputs of tiny PyTorch
reference models (tests/assets, made by tests/assets/make_vit_golden.py),
RoPE against the original parametrisation, presets, helpers."""
import contextlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efiqa_jax import checkpoints
from efiqa_jax import kernels
from efiqa_jax.models import vit


@pytest.mark.parametrize("kernels_on", [True, False], ids=["kernels",
                                                           "plain"])
@pytest.mark.parametrize("name", ["dinov3", "dinov2"])
def test_golden_reference_output(repo_root, name, kernels_on):
  """Ported tiny HF model == the HF model's own last_hidden_state, with the
  kernels and in plain XLA (README: <= 6e-6 in float32)."""
  assets = repo_root / "tests" / "assets"
  model, meta = checkpoints.load_model(assets / f"vit_golden_{name}",
                                       architecture="vit")
  data = np.load(assets / f"vit_golden_{name}.npz")
  with contextlib.nullcontext() if kernels_on else kernels.disabled():
    out = np.asarray(jax.jit(lambda m, x: m(x))(model,
                                                jnp.asarray(data["x"])))
  assert out.shape == data["expected"].shape
  assert np.abs(out - data["expected"]).max() <= 6e-6
  assert meta["source"]["family"] == name
  if name == "dinov2":  # the golden input resamples the 9x9 table to 3x4
    assert model.cfg["pos_grid"] == 9 and data["x"].shape[1:3] == (42, 56)


def test_rope_matches_original_periods():
  """HF inv_freq table == original dinov3 `periods` parametrisation."""
  hd, gh, gw = 64, 14, 20
  cos, sin = vit.rope_tables(gh, gw, hd, 100.0)
  periods = 100.0 ** (2 * np.arange(hd // 4) / (hd // 2))
  cy = 2 * (np.arange(gh) + 0.5) / gh - 1
  cx = 2 * (np.arange(gw) + 0.5) / gw - 1
  coords = np.stack(np.meshgrid(cy, cx, indexing="ij"), -1).reshape(-1, 2)
  ang = 2 * math.pi * coords[:, :, None] / periods[None, None, :]
  ang = np.tile(ang.reshape(gh * gw, -1), (1, 2))
  assert np.abs(cos - np.cos(ang)).max() < 1e-6
  assert np.abs(sin - np.sin(ang)).max() < 1e-6


def test_rope_is_applied_in_attention():
  """Identity rotation is a no-op; a real table changes the output."""
  attn = vit.Attention(32, 2, "qv", jnp.float32, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (1, 5 + 6, 32))
  cos, sin = vit.rope_tables(2, 3, 16, 100.0)
  f = jax.jit(lambda a, v, r: a(v, r))
  plain = jax.jit(lambda a, v: a(v))(attn, x)
  # With identity rotation (cos=1, sin=0) RoPE must be a no-op.
  same = f(attn, x, (np.ones_like(cos), np.zeros_like(sin)))
  np.testing.assert_allclose(same, plain, atol=1e-6)
  assert np.abs(f(attn, x, (cos, sin)) - plain).max() > 1e-3


def test_patch_grid_and_token_order():
  m = vit.build("tiny")
  fwd = jax.jit(lambda mm, v: mm(v))
  x = jax.random.normal(jax.random.key(0), (2, 48, 80, 3))
  h = fwd(m, x)
  assert h.shape == (2, 1 + 4 + 3 * 5, 32)
  g = vit.patch_grid(h, 3, 5)
  assert g.shape == (2, 3, 5, 32)
  np.testing.assert_array_equal(g[:, 1, 2], h[:, 5 + 1 * 5 + 2])
  np.testing.assert_array_equal(
      jax.jit(lambda mm, v: mm.patch_features(v))(m, x), g)
  # Remainder pixels are dropped (floor), as in torch.
  assert jax.eval_shape(fwd, m, x[:, :47, :95]).shape == (2, 5 + 2 * 5, 32)
  with pytest.raises(ValueError):
    vit.patch_grid(h, 5, 5)


def test_bfloat16_close_to_float32():
  m32 = vit.build("tiny")
  x = jax.random.normal(jax.random.key(0), (1, 64, 64, 3))
  fwd = jax.jit(lambda mm, v: mm(v))
  ref = np.asarray(fwd(m32, x))
  mbf = vit.VisionTransformer(**vit.vit_config("tiny"), dtype=jnp.bfloat16,
                              rngs=nnx.Rngs(0))
  nnx.update(mbf, nnx.state(m32, nnx.Param))
  out = np.asarray(fwd(mbf, x), np.float32)
  cos = (out * ref).sum(-1) / (np.linalg.norm(out, axis=-1)
                               * np.linalg.norm(ref, axis=-1))
  assert cos.min() > 0.999


def test_frozen_bf16_kernels_same_forward():
  """checkpoints.cast_frozen_kernels stores the kernels as the bf16 forward
  would round them anyway: the output is unchanged, biases/norms stay
  float32, and a float32 model is left alone."""
  from efiqa_jax import checkpoints  # pylint: disable=g-import-not-at-top
  m32 = vit.build("tiny")
  x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
  fwd = jax.jit(lambda mm, v: mm(v))
  mbf = vit.VisionTransformer(**vit.vit_config("tiny"), dtype=jnp.bfloat16,
                              rngs=nnx.Rngs(0))
  nnx.update(mbf, nnx.state(m32, nnx.Param))
  before = np.asarray(fwd(mbf, x), np.float32)
  checkpoints.cast_frozen_kernels(mbf)
  flat = dict(nnx.to_flat_state(nnx.state(mbf, nnx.Param)))
  kernels = {k for k in flat if k[-1] == "kernel"}
  assert kernels and all(flat[k][...].dtype == jnp.bfloat16 for k in kernels)
  assert all(v[...].dtype == jnp.float32 for k, v in flat.items()
             if k not in kernels)
  np.testing.assert_array_equal(np.asarray(fwd(mbf, x), np.float32), before)
  checkpoints.cast_frozen_kernels(m32)
  assert all(v[...].dtype == jnp.float32 for _, v in
             nnx.to_flat_state(nnx.state(m32, nnx.Param)))


def test_presets_shapes():
  expect = {  # name: (params in millions, rough), token count at 224
      "dinov3_vitl16": (303, 1 + 4 + 196),
      "dinov2_vitl14_reg": (304, 1 + 4 + 256),
  }
  for name, (mparams, tokens) in expect.items():
    m = nnx.eval_shape(lambda: vit.build(name))
    n = sum(int(np.prod(v.shape)) for _, v in
            nnx.to_flat_state(nnx.state(m, nnx.Param)))
    assert abs(n / 1e6 - mparams) < 2, (name, n)
    out = jax.eval_shape(lambda mm, x: mm(x), m,
                         jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
    assert out.shape == (1, tokens, m.cfg["hidden_size"]), name
  assert vit.vit_config("dinov3_vitl16")["ln_eps"] == 1e-5
  with pytest.raises(ValueError, match="unknown ViT preset"):
    vit.vit_config("dinov5")
  with pytest.raises(ValueError, match="unknown ViT config"):
    vit.vit_config("tiny", heads=3)


def test_fixed_interp_refuses_other_grids():
  m = vit.build("vit_b16", depth=1, hidden_size=32, num_heads=2,
                mlp_hidden=64, interp="fixed")
  fwd = lambda mm, v: mm(v)
  assert jax.eval_shape(fwd, m, jnp.zeros((1, 224, 224, 3))).shape == (
      1, 197, 32)
  with pytest.raises(ValueError, match="fixed"):
    jax.eval_shape(fwd, m, jnp.zeros((1, 256, 256, 3)))
