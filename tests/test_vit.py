"""ViT encoder tests that run without torch: golden outputs of tiny PyTorch
reference models (tests/assets, made by tests/assets/make_vit_golden.py),
RoPE against the original parametrisation, presets, helpers."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efiqa_jax import checkpoints
from efiqa_jax.models import vit


@pytest.mark.parametrize("name", ["dinov3", "dinov2"])
def test_golden_reference_output(repo_root, name):
  """Ported tiny HF model == the HF model's own last_hidden_state."""
  assets = repo_root / "tests" / "assets"
  model, meta = checkpoints.load_model(assets / f"vit_golden_{name}",
                                       architecture="vit")
  data = np.load(assets / f"vit_golden_{name}.npz")
  out = np.asarray(jax.jit(lambda m, x: m(x))(model, jnp.asarray(data["x"])))
  assert out.shape == data["expected"].shape
  assert np.abs(out - data["expected"]).max() <= 1e-5
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


@pytest.mark.parametrize("qkv_bias", ["qv", "qkv", "none"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_inference_form_same_forward(qkv_bias, dtype):
  """vit.inference_copy (16-bit kernels cast, q/k/v fused into one
  projection, every kernel held (out, in)) gives the forward of the plain
  frozen model: bit for bit in bf16, within float32 rounding (measured
  1.2e-7 here; bit for bit at ViT-L shapes) in float32. A missing bias is
  fused as zeros. The source model is left as it was, and a second
  to_inference_form changes nothing."""
  from efiqa_jax import checkpoints  # pylint: disable=g-import-not-at-top
  m32 = vit.build("tiny", qkv_bias=qkv_bias)
  # Non-zero biases (they initialise to 0), so that fusing them is checked.
  for path, var in nnx.to_flat_state(nnx.state(m32, nnx.Param)):
    if path[-1] == "bias":
      var.value = jax.random.normal(jax.random.key(len(path)), var.shape)
  before = {k: np.asarray(v[...]) for k, v in
            nnx.to_flat_state(nnx.state(m32, nnx.Param))}
  plain = vit.VisionTransformer(**m32.cfg, dtype=jnp.dtype(dtype),
                                rngs=nnx.Rngs(0))
  nnx.update(plain, nnx.state(m32, nnx.Param))
  checkpoints.cast_frozen_kernels(plain)
  inf = vit.inference_copy(m32, jnp.dtype(dtype))
  x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
  fwd = jax.jit(lambda mm, v: mm(v))
  want = np.asarray(fwd(plain, x), np.float32)
  got = np.asarray(fwd(inf, x), np.float32)
  if dtype == "bfloat16":
    np.testing.assert_array_equal(got, want)
  else:  # XLA:CPU may pick other float32 kernels at these tiny shapes
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
  inf.to_inference_form()
  np.testing.assert_array_equal(np.asarray(fwd(inf, x), np.float32), got)

  flat = dict(nnx.to_flat_state(nnx.state(inf, nnx.Param)))
  names = {"/".join(map(str, k)) for k in flat}
  assert "blocks/0/attn/qkv/kernel" in names
  assert not any("/attn/q/" in n or "/attn/k/" in n for n in names)
  d, hid = m32.cfg["hidden_size"], m32.cfg["mlp_hidden"]
  assert flat[("blocks", "0", "attn", "qkv", "kernel")].shape == (3 * d, d)
  assert flat[("blocks", "0", "mlp", "fc1", "kernel")].shape == (hid, d)
  after = {k: np.asarray(v[...]) for k, v in
           nnx.to_flat_state(nnx.state(m32, nnx.Param))}
  assert after.keys() == before.keys()
  assert all(np.array_equal(after[k], before[k]) for k in before)


def test_bf16_linear_rounds_once():
  """x.W + b in float32, one rounding to bf16 at the end. Rounding the dot
  first (4112 is a bf16 tie -> 4096) and then adding the bias would give
  4096 + 15 -> 4096; one rounding of 4127 gives 4128."""
  lin = vit.Linear(4112, 1, use_bias=True, dtype=jnp.bfloat16,
                   param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  lin.kernel.value = jnp.ones((4112, 1), jnp.float32)
  lin.bias.value = jnp.full((1,), 15.0, jnp.float32)
  y = jax.jit(lambda m, v: m(v))(lin, jnp.ones((1, 4112), jnp.bfloat16))
  assert y.dtype == jnp.bfloat16
  assert float(y[0, 0]) == 4128.0


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
