"""Every op of efiqa_jax.kernels against its plain form (values, and
gradients where the fast form has its own), and the switch that selects the
plain forms."""
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efiqa_jax import kernels
from efiqa_jax.kernels import (attention, conv, median, png, pool, resize,
                               switch, vit_inference, xla_cpu)
from efiqa_jax.models import vit


def _rand(shape, seed=0, dtype=np.float32):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape)
                     .astype(dtype))


def _both(fn, *args):
  """fn(*args) traced with kernels on, then off (one jitted function)."""
  f = jax.jit(fn)
  on = f(*args)
  with kernels.disabled():
    off = f(*args)
  return on, off


def _rel_close(a, b, tol):
  """max |a - b| <= tol * max |b|, per leaf."""
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    assert np.abs(x - y).max() <= tol * np.abs(y).max(), (
        np.abs(x - y).max(), np.abs(y).max())


def _close(a, b, rtol, atol=0.0):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x, np.float32),
                               np.asarray(y, np.float32), rtol=rtol, atol=atol)


# ------------------------------------------------------------------ switch

def test_switch_retraces_instead_of_reusing():
  traced = []

  @jax.jit
  def f(x):
    traced.append(kernels.enabled())
    return x + 1

  x = jnp.zeros(3)
  f(x)
  with kernels.disabled():
    assert not kernels.enabled()
    f(x)
  f(x)  # back on: the first trace is reused
  assert traced == [True, False] and kernels.enabled()


def test_set_enabled_and_env(monkeypatch):
  try:
    kernels.set_enabled(False)
    assert not kernels.enabled()
  finally:
    kernels.set_enabled(True)
  assert kernels.enabled()
  for v, want in (("off", False), ("0", False), ("ON", True), ("", True)):
    monkeypatch.setenv(switch.ENV, v)
    assert switch._from_env() is want  # pylint: disable=protected-access
  monkeypatch.setenv(switch.ENV, "fast")
  with pytest.raises(ValueError, match="EFIQA_KERNELS"):
    switch._from_env()  # pylint: disable=protected-access


# -------------------------------------------------------------------- conv

@pytest.mark.parametrize("shape,k,dtype", [
    ((2, 8, 10, 5, 7), 3, "float32"),     # CPU custom-VJP, direct / taps
    ((1, 32, 32, 17, 9), 3, "float32"),   # Winograd weight gradient
    ((2, 8, 8, 6, 3), 1, "float32"),      # 1x1 as a matmul
    ((1, 16, 16, 4, 5), 5, "float32"),    # any odd k
    ((2, 8, 8, 6, 4), 3, "bfloat16")])
def test_conv2d_same_equals_plain(shape, k, dtype):
  b, h, w, ci, co = shape
  x = _rand((b, h, w, ci), 1).astype(dtype)
  wk = (_rand((k, k, ci, co), 2) / np.sqrt(k * k * ci)).astype(dtype)
  g = _rand((b, h, w, co), 3).astype(dtype)

  def run(x, wk, g):
    y, vjp = jax.vjp(conv.conv2d_same, x, wk)
    return (y, *vjp(g))

  on, off = _both(run, x, wk, g)
  # Winograd F(4x4, 3x3) loses about a digit in float32 (test_winograd.py);
  # bf16: other summation orders, rounded to bf16.
  _rel_close(on, off, 5e-5 if dtype == "float32" else 2e-2)


def test_conv2d_same_dispatch_off_cpu(monkeypatch):
  """Off XLA:CPU the 3x3 conv is lax's (cuDNN / TPU convs are fastest plain);
  the 1x1 stays a matmul."""
  monkeypatch.setattr(switch, "backend", lambda: "gpu")

  def boom(*a):
    raise AssertionError("the XLA:CPU conv ran off CPU")

  monkeypatch.setattr(conv, "conv2d_same_cpu", boom)
  x = _rand((1, 8, 8, 3))
  jax.eval_shape(conv.conv2d_same, x, _rand((3, 3, 3, 4)))
  monkeypatch.setattr(conv, "conv2d_same_plain", boom)
  jax.eval_shape(conv.conv2d_same, x, _rand((1, 1, 3, 4)))
  with pytest.raises(ValueError, match="odd square"):
    conv.conv2d_same(x, _rand((2, 2, 3, 4)))


def test_conv1x1_equals_plain():
  x, wk, g = _rand((2, 5, 7, 6)), _rand((1, 1, 6, 3), 1), _rand((2, 5, 7, 3))

  def run(x, wk, g):
    y, vjp = jax.vjp(conv.conv1x1, x, wk)
    return (y, *vjp(g))

  on, off = _both(run, x, wk, g)
  _close(on, off, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_conv_transpose_2x2_equals_plain(dtype):
  x = _rand((2, 3, 5, 6)).astype(dtype)
  wk = _rand((2, 2, 6, 4), 1).astype(dtype)
  g = _rand((2, 6, 10, 4), 2).astype(dtype)

  def run(x, wk, g):
    y, vjp = jax.vjp(conv.conv_transpose_2x2, x, wk)
    return (y, *vjp(g))

  on, off = _both(run, x, wk, g)  # off: lax.conv_transpose, nnx's form
  assert on[0].shape == (2, 6, 10, 4)
  # Each output is one product of 6 terms either way.
  tol = 1e-5 if dtype == "float32" else 0.02
  _close(on, off, rtol=tol, atol=tol)


# -------------------------------------------------------------------- pool

def test_max_pool_equals_plain_with_ties():
  x = np.random.default_rng(0).integers(0, 3, (2, 6, 8, 3)).astype(np.float32)
  x[0, :2, :2] = 1.0  # a window of ties: the gradient goes to its first
  g = _rand((2, 3, 4, 3), 1)

  def run(x, g):
    y, vjp = jax.vjp(pool.max_pool_2x2, x)
    return (y, *vjp(g))

  on, off = _both(run, jnp.asarray(x), g)
  for a, b in zip(on, off):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  dx = np.asarray(on[1])
  assert dx[0, 0, 0].all() and not dx[0, 0, 1].any() and not dx[0, 1, :2].any()
  # Odd sizes drop the last row / column (VALID), through the plain form.
  assert pool.max_pool_2x2(jnp.zeros((1, 5, 7, 2))).shape == (1, 2, 3, 2)


# --------------------------------------------------------------- attention

@pytest.mark.parametrize("dtype,tol", [("float32", 2e-6), ("bfloat16", 0.02)])
def test_attention_equals_plain(dtype, tol):
  q, k, v = (_rand((2, 11, 3, 8), s).astype(dtype) for s in range(3))
  g = _rand((2, 11, 3, 8), 3).astype(dtype)

  def run(q, k, v, g):
    y, vjp = jax.vjp(lambda *a: attention.dot_product_attention(
        *a, scale=8 ** -0.5), q, k, v)
    return (y, *vjp(g))

  on, off = _both(run, q, k, v, g)
  assert on[0].dtype == jnp.dtype(dtype)
  _close(on, off, rtol=tol, atol=tol)
  ref = jax.nn.dot_product_attention(q.astype(jnp.float32),
                                     k.astype(jnp.float32),
                                     v.astype(jnp.float32))
  _close(off[0], ref, rtol=tol, atol=tol)


def test_cudnn_is_checked_up_front_and_never_swallowed(monkeypatch):
  q = jnp.zeros((1, 4, 2, 64), jnp.bfloat16)
  assert not attention.cudnn_supported(q, q, q)  # CPU
  monkeypatch.setattr(switch, "backend", lambda: "gpu")
  for cap, want in (((9, 0), True), ((8, 0), True), ((7, 5), False),
                    (None, False)):
    monkeypatch.setattr(attention, "gpu_compute_capability", lambda c=cap: c)
    assert attention.cudnn_supported(q, q, q) is want, cap
  monkeypatch.setattr(attention, "gpu_compute_capability", lambda: (8, 0))
  assert not attention.cudnn_supported(*(3 * [q.astype(jnp.float32)]))
  odd = jnp.zeros((1, 4, 2, 12), jnp.bfloat16)
  assert not attention.cudnn_supported(odd, odd, odd)
  big = jnp.zeros((1, 4, 2, 192), jnp.bfloat16)
  assert not attention.cudnn_supported(big, big, big)

  def fails(*a, **kw):
    raise RuntimeError("cuDNN failed")

  monkeypatch.setattr(jax.nn, "dot_product_attention", fails)
  with pytest.raises(RuntimeError, match="cuDNN failed"):
    attention.dot_product_attention(q, q, q, scale=0.125)


@pytest.mark.parametrize("layout", ["in_out", "out_in"])
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-6), ("bfloat16", 0.02)])
def test_dense_equals_plain(layout, dtype, tol):
  x, w, b = _rand((3, 5, 16)), _rand((16, 8), 1) / 4, _rand((8,), 2)
  wl = w if layout == "in_out" else w.T

  def fwd(x, w, b):
    return (attention.dense(x, w, b, dtype=dtype, w_layout=layout),
            attention.dense(x, w, None, dtype=dtype, activation=jax.nn.relu,
                            w_layout=layout))

  def run(x, w, b):
    ys, vjp = jax.vjp(fwd, x, w, b)
    return ys, vjp(tuple(jnp.ones_like(y) for y in ys))

  (on, don), (off, doff) = _both(run, x, wl, b)
  assert on[0].dtype == jnp.dtype(dtype)
  _close(on, off, rtol=tol, atol=tol)
  _close(on[0], x @ w + b, rtol=tol, atol=tol)
  _rel_close(don, doff, 1e-6 if dtype == "float32" else 2e-2)


def test_dense_bf16_rounds_once():
  """x.W + b in float32, one rounding to bf16 at the end. Rounding the dot
  first (4112 is a bf16 tie -> 4096) and then adding the bias gives
  4096 + 15 -> 4096 (the plain form); one rounding of 4127 gives 4128."""
  x, w = jnp.ones((1, 4112), jnp.bfloat16), jnp.ones((4112, 1), jnp.float32)
  b = jnp.full((1,), 15.0, jnp.float32)
  on, off = _both(lambda x, w, b: attention.dense(x, w, b,
                                                  dtype=jnp.bfloat16), x, w, b)
  assert on.dtype == jnp.bfloat16
  assert float(on[0, 0]) == 4128.0 and float(off[0, 0]) == 4096.0


def test_dense_bf16_adds_the_float32_bias():
  """The fast form adds the bias as stored (float32), not rounded to bf16
  first: 0 + 1.00390625 (bf16 rounds it to 1.0) then 256 -> 257.00390625,
  one rounding -> 258 (bf16 spacing at 256 is 2); a bias rounded first gives
  256 + 1 = 257 -> 256 (tie to even)."""
  x, w = jnp.ones((1, 256), jnp.bfloat16), jnp.ones((256, 1), jnp.float32)
  b = jnp.full((1,), 1.00390625, jnp.float32)
  for layout, wl in (("in_out", w), ("out_in", w.T)):
    on, off = _both(lambda x, w, b: attention.dense(
        x, w, b, dtype=jnp.bfloat16, w_layout=layout), x, wl, b)  # pylint: disable=cell-var-from-loop
    assert float(on[0, 0]) == 258.0 and float(off[0, 0]) == 256.0


# ------------------------------------------------------------ vit inference

def _vit(**kw):
  """A tiny ViT (built abstractly, no PRNG compile) with random parameters,
  biases included (they initialise to 0), so that fusing them is checked."""
  cfg = vit.vit_config("tiny", **kw)
  m = nnx.eval_shape(lambda: vit.VisionTransformer(**cfg, rngs=nnx.Rngs(0)))
  state = nnx.state(m, nnx.Param)
  rng = np.random.default_rng(0)
  pure = jax.tree.map(
      lambda v: jnp.asarray(rng.standard_normal(v.shape) * 0.2, jnp.float32),
      nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(m, state)
  return m


def test_inference_params_is_pure_and_fuses():
  m = _vit(qkv_bias="qv")
  params = nnx.to_pure_dict(nnx.state(m, nnx.Param))
  before = jax.tree.map(np.asarray, params)
  inf = vit_inference.inference_params(params, jnp.bfloat16)
  jax.tree.map(np.testing.assert_array_equal, before,
               jax.tree.map(np.asarray, params))  # unchanged
  a, b0 = inf["blocks"]["0"]["attn"], params["blocks"]["0"]["attn"]
  d, hid = m.cfg["hidden_size"], m.cfg["mlp_hidden"]
  assert set(a) == {"qkv", "out"}
  assert a["qkv"]["kernel"].shape == (3 * d, d)
  assert a["qkv"]["kernel"].dtype == jnp.bfloat16
  assert a["qkv"]["bias"].dtype == jnp.float32
  np.testing.assert_array_equal(a["qkv"]["bias"][d:2 * d], 0)  # no k bias
  np.testing.assert_array_equal(
      np.asarray(a["qkv"]["kernel"][2 * d:], np.float32),
      np.asarray(b0["v"]["kernel"].T.astype(jnp.bfloat16), np.float32))
  assert inf["blocks"]["0"]["mlp"]["fc1"]["kernel"].shape == (hid, d)
  assert inf["norm"]["scale"].dtype == jnp.float32
  # float32: nothing is cast; the rest of the tree is the checkpoint's.
  f32 = vit_inference.inference_params(params)
  assert f32["patch_embed"]["kernel"] is params["patch_embed"]["kernel"]


@pytest.mark.parametrize("qkv_bias,ffn,dtype", [
    ("qv", "mlp", "bfloat16"), ("qkv", "swiglu", "float32"),
    ("none", "mlp", "float32")])
def test_inference_model_same_forward(qkv_bias, ffn, dtype):
  """The inference form gives the frozen model's forward: bit for bit in
  bf16, within float32 rounding in float32 (XLA:CPU may pick other kernels
  for the fused shapes). `model` is left as it was; with kernels off it is a
  plain VisionTransformer on the checkpoint tree."""
  from efiqa_jax import checkpoints  # pylint: disable=g-import-not-at-top
  m32 = _vit(qkv_bias=qkv_bias, ffn=ffn)
  before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(m32)))
  plain = vit.VisionTransformer(**m32.cfg, dtype=jnp.dtype(dtype),
                                rngs=nnx.Rngs(0))
  nnx.update(plain, nnx.state(m32, nnx.Param))
  checkpoints.cast_frozen_kernels(plain)
  inf = vit_inference.inference_model(m32, dtype)
  assert isinstance(inf, vit_inference.InferenceViT)
  x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
  fwd = jax.jit(lambda mm, v: mm(v))
  want = np.asarray(fwd(plain, x), np.float32)
  got = np.asarray(fwd(inf, x), np.float32)
  if dtype == "bfloat16":
    np.testing.assert_array_equal(got, want)
  else:
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, before,
               jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(m32))))
  if qkv_bias == "none":
    with kernels.disabled():
      off = vit_inference.inference_model(m32, dtype)
      assert type(off) is vit.VisionTransformer  # pylint: disable=unidiomatic-typecheck
      np.testing.assert_allclose(np.asarray(fwd(off, x)), want, rtol=0,
                                 atol=1e-5)


def test_inference_model_is_not_a_checkpoint(tmp_path):
  from efiqa_jax import checkpoints  # pylint: disable=g-import-not-at-top
  inf = vit_inference.inference_model(_vit())
  with pytest.raises(TypeError, match="cannot be saved"):
    checkpoints.save_model(tmp_path / "m", inf)


# ------------------------------------------------------- resize and median

@pytest.mark.parametrize("hi,ho", [(512, 128), (512, 256), (256, 512),
                                   (128, 512), (64, 16), (16, 64),
                                   (300, 77), (584, 1024)])
def test_resize_linear_equals_plain(hi, ho):
  x = np.random.default_rng(hi + ho).random((2, hi, 2 * hi)).astype(np.float32)
  g = np.random.default_rng(ho).random((2, ho, 2 * ho)).astype(np.float32)

  def run(a, g):
    y, vjp = jax.vjp(lambda v: resize.resize_linear(v, ho, 2 * ho), a)
    return y, vjp(g)[0]

  (on, don), (off, doff) = _both(run, x, g)
  np.testing.assert_array_equal(
      np.asarray(off), np.asarray(jax.image.resize(
          x, (2, ho, 2 * ho), "linear", antialias=True)))
  # float32 summation order only (measured <= 1.8e-7 for values in [0, 1]).
  np.testing.assert_allclose(np.asarray(on), np.asarray(off), atol=5e-7)
  _rel_close(don, doff, 1e-6)


def test_masked_median_is_nanmedian_bit_for_bit():
  """Rows of random, tied, zero-heavy and empty selections, odd and even
  counts, scales 1e-6 .. 1e2, against jnp.nanmedian."""
  rng = np.random.default_rng(0)
  n = 1999
  x = (np.abs(rng.standard_normal((12, n)))
       * 10 ** rng.uniform(-6, 2, (12, 1))).astype(np.float32)
  x[::3] = np.round(x[::3], 1)  # ties
  x[::4, : n // 2] = 0
  valid = rng.random((12, n)) < rng.uniform(0.05, 1, (12, 1))
  valid[5] = False  # an empty row gives 0
  valid[7, :] = False
  valid[7, :2] = True  # an even count: the mean of the middle two
  want = np.nan_to_num(np.asarray(jnp.nanmedian(
      jnp.where(valid, x, jnp.nan), axis=1)), nan=0.0)
  on, off = _both(median.masked_median_nonneg, x, valid)
  np.testing.assert_array_equal(np.asarray(on), want)
  np.testing.assert_array_equal(np.asarray(off), want)
  # The bit search has no derivative of its own: it takes the plain form's.
  grad = lambda a, m: jax.grad(
      lambda v: (median.masked_median_nonneg(v, m) ** 2).sum())(a)
  gon, goff = _both(grad, x, valid)
  np.testing.assert_array_equal(np.asarray(gon), np.asarray(goff))
  assert np.count_nonzero(np.asarray(gon)) >= 10


# ----------------------------------------------------------------- xla_cpu

def test_materialize_and_map_examples_equal_plain():
  x = _rand((3, 4, 5))

  def run(x):
    y, vjp = jax.vjp(lambda v: xla_cpu.materialize(jnp.sin(v)) * 2, x)
    t, vjp_map = jax.vjp(lambda v: xla_cpu.map_examples(
        lambda u: (jnp.sin(u).sum(axis=(1, 2)), u * 2), v), x)
    return (y, *vjp(jnp.ones_like(x)), *t,
            *vjp_map((jnp.ones((3,)), jnp.ones_like(x))))

  on, off = _both(run, x)
  _close(on, off, rtol=1e-6)  # sums: one example at a time vs batched
  np.testing.assert_allclose(np.asarray(on[4]), np.cos(np.asarray(x)) + 2,
                             rtol=1e-6)
  assert on[2].shape == (3,) and on[3].shape == (3, 4, 5)
  np.testing.assert_array_equal(np.asarray(on[3]), 2 * np.asarray(x))
  # A NaN passes through unchanged (-(-nan) is nan).
  nan = jax.jit(xla_cpu.materialize)(jnp.array([jnp.nan, 1.0]))
  assert np.isnan(nan[0]) and nan[1] == 1.0


# --------------------------------------------------------------------- png

@pytest.mark.parametrize("shape", [(37, 53), (37, 53, 1), (20, 31, 2),
                                   (64, 48, 3), (9, 7, 4), (1, 1, 3)])
def test_png_equals_plain(shape):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  a = rng.integers(0, 256, size=shape, dtype=np.uint8)
  a[: shape[0] // 2] = 7  # runs and wrap-around differences in one image
  got = np.asarray(Image.open(io.BytesIO(png.encode_png(a))))
  np.testing.assert_array_equal(got, a.reshape(got.shape))
  plain = np.asarray(Image.open(io.BytesIO(png.encode_png_plain(a))))
  np.testing.assert_array_equal(plain, got)


def test_png_other_arrays_and_write(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from efiqa_jax import report  # pylint: disable=g-import-not-at-top
  b = np.random.default_rng(1).integers(0, 65536, size=(5, 6),
                                        dtype=np.uint16)
  np.testing.assert_array_equal(
      np.asarray(Image.open(io.BytesIO(png.encode_png(b)))), b)
  p = str(tmp_path / "x.png")
  report.write_png(p, b)
  np.testing.assert_array_equal(np.asarray(Image.open(p)), b)
  assert not list(tmp_path.glob("*.tmp*"))
  with pytest.raises(Exception):
    png.encode_png(np.zeros((4, 4, 5), np.uint8))
