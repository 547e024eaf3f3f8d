"""One configurable Vision Transformer encoder (Flax NNX) for the foundation
models EFIQA stands on: DINOv3, DINOv2 (with / without registers), RETFound-MAE
and plain timm/augreg ViTs.

Exact spec: shared/reference/vit-porting.md. The points that matter for parity:
  * token order [CLS, registers, patches (row-major)]; registers get no
    absolute position embedding (DINOv2 adds it before inserting them);
  * DINOv3: RoPE (base 100, "separate" coordinate normalisation) on the patch
    tokens of q and k only; LayerNorm eps 1e-5; no key bias;
  * exact (erf) GELU, LayerNorm with use_fast_variance=False, attention logits
    and softmax in float32;
  * learned position tables are resampled for other grids exactly as the
    reference does: `bicubic` (torch size-based, antialias off: HF Dinov2 >=4.45,
    HF ViT/ViT-MAE, RETFound), `bicubic_offset` (original DINOv2 hub non-reg
    models: scale_factor (n+0.1)/M), `bicubic_aa` (antialias on: HF
    Dinov2WithRegisters, hub reg models, timm), `fixed` (error unless native).

On GPU, run float32 parity work under `jax.default_matmul_precision("float32")`
(JAX uses TF32 for float32 matmuls/convs there by default).

`VisionTransformer(...)(x)` takes NHWC float images (already normalised) and
returns `last_hidden_state` (B, 1 + R + gh*gw, D); `patch_grid` reshapes the
patch tokens to (B, gh, gw, D).
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efiqa_jax.kernels import attention

FFN_KINDS = ("mlp", "swiglu")
QKV_BIAS = ("qkv", "qv", "none")
POS_KINDS = ("rope", "learned", "sincos", "none")
INTERP = ("bicubic", "bicubic_offset", "bicubic_aa", "fixed")


# ---------------------------------------------------------------------------
# Presets.

def _dinov3(d, depth, heads, hidden, ffn="mlp", qkv_bias="qv"):
  return dict(patch_size=16, hidden_size=d, depth=depth, num_heads=heads,
              mlp_hidden=hidden, ffn=ffn, num_registers=4, layerscale=True,
              qkv_bias=qkv_bias, ln_eps=1e-5, pos="rope", rope_base=100.0)


def _dinov2(d, depth, heads, hidden, ffn="mlp", registers=0):
  # HF/hub non-reg models resample with the size-based torch bicubic; the
  # register models (HF Dinov2WithRegisters, hub *_reg) with antialias on.
  return dict(patch_size=14, hidden_size=d, depth=depth, num_heads=heads,
              mlp_hidden=hidden, ffn=ffn, num_registers=registers,
              layerscale=True, qkv_bias="qkv", ln_eps=1e-6, pos="learned",
              pos_grid=37, pos_cls=True,
              interp="bicubic_aa" if registers else "bicubic")


def _timm(d, depth, heads, patch=16, pos="learned", interp="bicubic_aa"):
  return dict(patch_size=patch, hidden_size=d, depth=depth, num_heads=heads,
              mlp_hidden=4 * d, ffn="mlp", num_registers=0, layerscale=False,
              qkv_bias="qkv", ln_eps=1e-6, pos=pos, pos_grid=224 // patch,
              pos_cls=True, interp=interp)


PRESETS: dict[str, dict[str, Any]] = {
    "dinov3_vits16": _dinov3(384, 12, 6, 1536),
    "dinov3_vits16plus": _dinov3(384, 12, 6, 1536, "swiglu"),
    "dinov3_vitb16": _dinov3(768, 12, 12, 3072),
    "dinov3_vitl16": _dinov3(1024, 24, 16, 4096),
    "dinov3_vith16plus": _dinov3(1280, 32, 20, 5120, "swiglu"),
    "dinov3_vit7b16": _dinov3(4096, 40, 32, 8192, "swiglu", "none"),
    "dinov2_vits14": _dinov2(384, 12, 6, 1536),
    "dinov2_vitb14": _dinov2(768, 12, 12, 3072),
    "dinov2_vitl14": _dinov2(1024, 24, 16, 4096),
    "dinov2_vitg14": _dinov2(1536, 40, 24, 4096, "swiglu"),
    "dinov2_vits14_reg": _dinov2(384, 12, 6, 1536, registers=4),
    "dinov2_vitb14_reg": _dinov2(768, 12, 12, 3072, registers=4),
    "dinov2_vitl14_reg": _dinov2(1024, 24, 16, 4096, registers=4),
    "dinov2_vitg14_reg": _dinov2(1536, 40, 24, 4096, "swiglu", 4),
    # RETFound-MAE: ViT-L/16, stored MAE sin-cos table; RETFound's own
    # interpolate_pos_embed is size-based bicubic, antialias off.
    "retfound_mae": _timm(1024, 24, 16, pos="sincos", interp="bicubic"),
    "vit_s16": _timm(384, 12, 6),
    "vit_b16": _timm(768, 12, 12),
    "vit_l16": _timm(1024, 24, 16),
    # Tiny DINOv3-like model for tests and smoke runs.
    "tiny": dict(_dinov3(32, 2, 2, 64)),
}


def vit_config(name: str, **overrides) -> dict[str, Any]:
  """Constructor kwargs of preset `name`, with `overrides` applied."""
  if name not in PRESETS:
    raise ValueError(f"unknown ViT preset {name!r}; known: {sorted(PRESETS)}")
  cfg = dict(PRESETS[name])
  unknown = set(overrides) - set(_DEFAULTS)
  if unknown:
    raise ValueError(f"unknown ViT config keys {sorted(unknown)}")
  cfg.update(overrides)
  return cfg


# ---------------------------------------------------------------------------
# Position tables and resampling (numpy, trace-time constants).

def torch_bicubic_matrix(n_in: int, n_out: int,
                         scale_factor: float | None = None,
                         float32: bool = True) -> np.ndarray:
  """(n_out, n_in) matrix equal to torch bicubic, align_corners=False,
  antialias=False (a=-0.75, border indices clamped). With `scale_factor`,
  coordinates map with 1/scale_factor like torch does when given one.

  `float32=True` computes the source coordinates and taps in float32 the way
  torch's CPU kernel does for float32 tensors (the references resample in
  float32): the float32 rounding of the scale alone moves the taps by up to
  ~1e-5 on a 37 -> 22 resample. `float32=False` is the exact float64 map.
  """
  f = np.float32 if float32 else np.float64
  if scale_factor:
    r = f(1.0 / scale_factor)
  else:
    r = f(n_in) / f(n_out)
  a = f(-0.75)
  one, two, three, four, five, eight, half = (f(v) for v in (1, 2, 3, 4, 5,
                                                             8, 0.5))

  def cc1(x):  # |x| <= 1, torch cubic_convolution1
    return ((a + two) * x - (a + three)) * x * x + one

  def cc2(x):  # 1 < |x| < 2, torch cubic_convolution2
    return ((a * x - five * a) * x + eight * a) * x - four * a

  w = np.zeros((n_out, n_in), np.float64)
  for i in range(n_out):
    s = r * (f(i) + half) - half
    x0 = math.floor(s)
    t = f(s - f(x0))
    taps = (cc2(t + one), cc1(t), cc1(one - t), cc2((one - t) + one))
    for idx, wt in zip(range(x0 - 1, x0 + 3), taps):
      w[i, min(max(idx, 0), n_in - 1)] += float(wt)
  return w


def resample_grid(table: jax.Array, out_hw: tuple[int, int],
                  method: str) -> jax.Array:
  """Resample a (M, N, D) position grid to out_hw with a reference method."""
  m, n, d = table.shape
  gh, gw = out_hw
  if method not in INTERP:
    raise ValueError(f"interp must be one of {INTERP}, got {method!r}")
  if method == "fixed":
    raise ValueError(f"position table is {m}x{n} and interp='fixed'; got a "
                     f"{gh}x{gw} patch grid")
  table = table.astype(jnp.float32)  # references resample in float32
  if method == "bicubic_aa":
    return jax.image.resize(table, (gh, gw, d), method="bicubic")
  if method == "bicubic":
    wh, ww = torch_bicubic_matrix(m, gh), torch_bicubic_matrix(n, gw)
  else:  # bicubic_offset: original DINOv2 hub, scale_factor=(g+0.1)/M
    wh = torch_bicubic_matrix(m, gh, (gh + 0.1) / m)
    ww = torch_bicubic_matrix(n, gw, (gw + 0.1) / n)
  hi = jax.lax.Precision.HIGHEST
  out = jnp.einsum("im,mnd->ind", jnp.asarray(wh, jnp.float32), table,
                   precision=hi)
  return jnp.einsum("jn,ind->ijd", jnp.asarray(ww, jnp.float32), out,
                    precision=hi)


def mae_sincos_table(dim: int, grid: int, cls: bool = True) -> np.ndarray:
  """MAE's fixed 2-D sin-cos table (models_mae / util.pos_embed), CLS slot 0.

  Layout as in the released MAE/RETFound checkpoints: [emb(w) | emb(h)]."""
  def emb_1d(d, pos):
    omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  gh = np.arange(grid, dtype=np.float32)
  gw = np.arange(grid, dtype=np.float32)
  g = np.meshgrid(gw, gh)  # MAE: w goes first
  g = np.stack(g, axis=0).reshape(2, 1, grid, grid)
  table = np.concatenate([emb_1d(dim // 2, g[0]), emb_1d(dim // 2, g[1])],
                         axis=1)
  if cls:
    table = np.concatenate([np.zeros((1, dim)), table], axis=0)
  return table[None].astype(np.float32)


@functools.lru_cache(maxsize=64)
def rope_tables(gh: int, gw: int, head_dim: int,
                base: float) -> tuple[np.ndarray, np.ndarray]:
  """DINOv3 RoPE cos/sin, (gh*gw, head_dim) float32, as HF computes them."""
  inv_freq = (1.0 / base ** np.arange(0, 1, 4 / head_dim, dtype=np.float32)
              ).astype(np.float32)
  ch = ((np.arange(0.5, gh, dtype=np.float32) / np.float32(gh)) * 2 - 1)
  cw = ((np.arange(0.5, gw, dtype=np.float32) / np.float32(gw)) * 2 - 1)
  coords = np.stack(np.meshgrid(ch, cw, indexing="ij"), -1).reshape(-1, 2)
  ang = (np.float32(2 * math.pi) * coords[:, :, None].astype(np.float32)
         * inv_freq[None, None, :]).astype(np.float32)
  ang = np.tile(ang.reshape(gh * gw, -1), (1, 2))
  cos, sin = np.cos(ang), np.sin(ang)
  cos.flags.writeable = sin.flags.writeable = False  # cached: shared
  return cos, sin


def _rotate_half(x):
  h = x.shape[-1] // 2
  return jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)


# ---------------------------------------------------------------------------
# Modules.

def _ln(d, eps, dtype, rngs):
  return nnx.LayerNorm(d, epsilon=eps, use_fast_variance=False, dtype=dtype,
                       param_dtype=jnp.float32, rngs=rngs)


class Linear(nnx.Linear):
  """nnx.Linear (same parameters and state names) computed by
  `kernels.attention.dense`; `activation`, if given, is applied before the
  result is rounded to the compute dtype."""

  def __call__(self, x, activation=None):
    bias = self.bias[...] if self.bias is not None else None
    return attention.dense(x, self.kernel[...], bias, dtype=self.dtype,
                           activation=activation)


def _dense(i, o, bias, dtype, rngs):
  return Linear(i, o, use_bias=bias, dtype=dtype,
                param_dtype=jnp.float32, rngs=rngs)


class LayerScale(nnx.Module):

  def __init__(self, d: int, *, rngs: nnx.Rngs):
    del rngs
    self.gamma = nnx.Param(jnp.full((d,), 1e-5, jnp.float32))

  def __call__(self, x):
    return x * self.gamma[...].astype(x.dtype)


def apply_rope(t: jax.Array, rope: tuple[np.ndarray, np.ndarray]
               ) -> jax.Array:
  """RoPE on the trailing patch tokens of t (B, N, heads, hd), in float32."""
  cos, sin = (jnp.asarray(a)[None, :, None, :] for a in rope)
  n, p = t.shape[1], cos.shape[1]
  t32 = t.astype(jnp.float32)
  pre, pat = t32[:, :n - p], t32[:, n - p:]
  return jnp.concatenate([pre, pat * cos + _rotate_half(pat) * sin], axis=1)


class Attention(nnx.Module):

  def __init__(self, d: int, heads: int, qkv_bias: str, dtype, *,
               rngs: nnx.Rngs):
    if d % heads:
      raise ValueError(f"hidden_size {d} not divisible by num_heads {heads}")
    self.heads = heads
    self.dtype = dtype
    self.q = _dense(d, d, qkv_bias in ("qkv", "qv"), dtype, rngs)
    self.k = _dense(d, d, qkv_bias == "qkv", dtype, rngs)
    self.v = _dense(d, d, qkv_bias in ("qkv", "qv"), dtype, rngs)
    self.out = _dense(d, d, True, dtype, rngs)

  def project(self, x):
    """The q, k and v projections of x (B, N, D)."""
    return self.q(x), self.k(x), self.v(x)

  def __call__(self, x, rope=None):
    b, n, d = x.shape
    h = self.heads
    q, k, v = (t.reshape(b, n, h, d // h) for t in self.project(x))
    if rope is not None:
      # Rotated in float32 (never bf16 RoPE), then back to the compute dtype.
      q = apply_rope(q, rope).astype(v.dtype)
      k = apply_rope(k, rope).astype(v.dtype)
    o = attention.dot_product_attention(q, k, v, scale=(d // h) ** -0.5)
    return self.out(o.reshape(b, n, d))


class Mlp(nnx.Module):

  def __init__(self, d: int, hidden: int, dtype, *, rngs: nnx.Rngs):
    self.fc1 = _dense(d, hidden, True, dtype, rngs)
    self.fc2 = _dense(hidden, d, True, dtype, rngs)

  def __call__(self, x):
    return self.fc2(self.fc1(x, activation=gelu))


def gelu(x):
  """Exact GELU as torch computes it, x/2 (1 + erf(x/sqrt(2)))."""
  return 0.5 * x * (1.0 + jax.lax.erf(x * np.float32(1.0 / math.sqrt(2.0))))


class SwiGLU(nnx.Module):

  def __init__(self, d: int, hidden: int, dtype, *, rngs: nnx.Rngs):
    self.gate = _dense(d, hidden, True, dtype, rngs)
    self.up = _dense(d, hidden, True, dtype, rngs)
    self.down = _dense(hidden, d, True, dtype, rngs)

  def __call__(self, x):
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class Block(nnx.Module):

  def __init__(self, cfg: dict, dtype, *, rngs: nnx.Rngs):
    d = cfg["hidden_size"]
    self.norm1 = _ln(d, cfg["ln_eps"], dtype, rngs)
    self.attn = Attention(d, cfg["num_heads"], cfg["qkv_bias"], dtype,
                          rngs=rngs)
    self.norm2 = _ln(d, cfg["ln_eps"], dtype, rngs)
    ffn = Mlp if cfg["ffn"] == "mlp" else SwiGLU
    self.mlp = ffn(d, cfg["mlp_hidden"], dtype, rngs=rngs)
    self.ls1 = LayerScale(d, rngs=rngs) if cfg["layerscale"] else None
    self.ls2 = LayerScale(d, rngs=rngs) if cfg["layerscale"] else None

  def __call__(self, x, rope=None):
    y = self.attn(self.norm1(x), rope)
    x = x + (self.ls1(y) if self.ls1 is not None else y)
    y = self.mlp(self.norm2(x))
    return x + (self.ls2(y) if self.ls2 is not None else y)


_DEFAULTS = dict(patch_size=16, hidden_size=768, depth=12, num_heads=12,
                 mlp_hidden=3072, ffn="mlp", num_registers=0,
                 layerscale=False, qkv_bias="qkv", ln_eps=1e-6,
                 pos="learned", pos_grid=14, pos_cls=True, interp="bicubic",
                 rope_base=100.0, in_channels=3)


class VisionTransformer(nnx.Module):
  """ViT encoder; see the module docstring. Parameters are float32; `dtype`
  is the compute dtype (attention logits, softmax and RoPE stay float32)."""
  ARCH = "vit"  # name in efiqa_jax.checkpoints
  block_cls = Block  # the inference form (kernels.vit_inference) swaps it

  def __init__(self, *, patch_size: int = 16, hidden_size: int = 768,
               depth: int = 12, num_heads: int = 12, mlp_hidden: int = 3072,
               ffn: str = "mlp", num_registers: int = 0,
               layerscale: bool = False, qkv_bias: str = "qkv",
               ln_eps: float = 1e-6, pos: str = "learned", pos_grid: int = 14,
               pos_cls: bool = True, interp: str = "bicubic",
               rope_base: float = 100.0, in_channels: int = 3,
               dtype: Any = jnp.float32, rngs: nnx.Rngs):
    for name, val, allowed in (("ffn", ffn, FFN_KINDS),
                               ("qkv_bias", qkv_bias, QKV_BIAS),
                               ("pos", pos, POS_KINDS),
                               ("interp", interp, INTERP)):
      if val not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {val!r}")
    if pos == "rope" and (hidden_size // num_heads) % 4:
      raise ValueError("RoPE needs head_dim divisible by 4")
    self.cfg = dict(patch_size=patch_size, hidden_size=hidden_size,
                    depth=depth, num_heads=num_heads, mlp_hidden=mlp_hidden,
                    ffn=ffn, num_registers=num_registers,
                    layerscale=layerscale, qkv_bias=qkv_bias, ln_eps=ln_eps,
                    pos=pos, pos_grid=pos_grid, pos_cls=pos_cls,
                    interp=interp, rope_base=rope_base,
                    in_channels=in_channels)
    self.dtype = jnp.dtype(dtype)
    d = hidden_size
    self.patch_embed = nnx.Conv(in_channels, d, (patch_size, patch_size),
                                strides=(patch_size, patch_size),
                                padding="VALID", dtype=dtype,
                                param_dtype=jnp.float32, rngs=rngs)
    init = nnx.initializers.truncated_normal(0.02)
    self.cls_token = nnx.Param(init(rngs.params(), (1, 1, d), jnp.float32))
    self.register_tokens = (
        nnx.Param(init(rngs.params(), (1, num_registers, d), jnp.float32))
        if num_registers else None)
    n_pos = (1 if pos_cls else 0) + pos_grid * pos_grid
    if pos == "learned":
      self.pos_embed = nnx.Param(init(rngs.params(), (1, n_pos, d),
                                      jnp.float32))
    elif pos == "sincos":
      self.pos_embed = nnx.Param(jnp.asarray(
          mae_sincos_table(d, pos_grid, pos_cls)))
    else:
      self.pos_embed = None
    # String keys: checkpoint paths are the same in memory and on disk.
    self.blocks = nnx.Dict({
        str(i): self.block_cls(self.cfg, dtype, rngs=rngs)
        for i in range(depth)})
    self.norm = _ln(d, ln_eps, dtype, rngs)

  def config(self) -> dict:
    """Constructor kwargs (JSON-able) that rebuild this module."""
    return dict(self.cfg, dtype=self.dtype.name)

  @property
  def num_prefix_tokens(self) -> int:
    return 1 + self.cfg["num_registers"]

  def grid(self, h: int, w: int) -> tuple[int, int]:
    p = self.cfg["patch_size"]
    return h // p, w // p

  def position_table(self, gh: int, gw: int) -> jax.Array:
    """(1, [1 +] gh*gw, D) absolute table for a gh x gw grid."""
    table = self.pos_embed[...]
    m = self.cfg["pos_grid"]
    if (gh, gw) == (m, m):
      return table  # every reference skips resampling at the native grid
    c = 1 if self.cfg["pos_cls"] else 0
    d = table.shape[-1]
    patch = resample_grid(table[0, c:].reshape(m, m, d), (gh, gw),
                          self.cfg["interp"]).reshape(1, gh * gw, d)
    return jnp.concatenate([table[:, :c], patch.astype(table.dtype)], axis=1)

  def embed(self, x: jax.Array) -> jax.Array:
    """Patch embedding + tokens + positions: (B, 1 + R + N, D)."""
    if x.ndim != 4 or x.shape[-1] != self.cfg["in_channels"]:
      raise ValueError(f"expected (B, H, W, {self.cfg['in_channels']}) "
                       f"input, got {x.shape}")
    b = x.shape[0]
    gh, gw = self.grid(x.shape[1], x.shape[2])
    if gh < 1 or gw < 1:
      raise ValueError(f"input {x.shape[1:3]} smaller than one patch")
    t = self.patch_embed(x.astype(self.dtype))
    d = t.shape[-1]
    t = t.reshape(b, gh * gw, d)
    cls = jnp.broadcast_to(self.cls_token[...].astype(t.dtype), (b, 1, d))
    if self.pos_embed is not None:
      pos = self.position_table(gh, gw).astype(t.dtype)
      if self.cfg["pos_cls"]:
        cls = cls + pos[:, :1]
        pos = pos[:, 1:]
      t = t + pos
    parts = [cls]
    if self.register_tokens is not None:
      # Registers go in after the position add: they get no position.
      parts.append(jnp.broadcast_to(
          self.register_tokens[...].astype(t.dtype),
          (b, self.cfg["num_registers"], d)))
    return jnp.concatenate(parts + [t], axis=1)

  def __call__(self, x: jax.Array) -> jax.Array:
    """NHWC normalised images -> last_hidden_state (B, 1 + R + gh*gw, D)."""
    gh, gw = self.grid(x.shape[1], x.shape[2])
    h = self.embed(x)
    rope = None
    if self.cfg["pos"] == "rope":
      rope = rope_tables(gh, gw, self.cfg["hidden_size"]
                         // self.cfg["num_heads"], self.cfg["rope_base"])
    for i in range(self.cfg["depth"]):
      h = self.blocks[str(i)](h, rope)
    return self.norm(h)

  def patch_features(self, x: jax.Array) -> jax.Array:
    """(B, gh, gw, D) normalised patch tokens (what EFIQA extracts)."""
    gh, gw = self.grid(x.shape[1], x.shape[2])
    return patch_grid(self(x), gh, gw)


def patch_grid(hidden: jax.Array, gh: int, gw: int) -> jax.Array:
  """last_hidden_state (B, prefix + gh*gw, D) -> patch grid (B, gh, gw, D).

  The prefix (CLS + registers) is whatever precedes the last gh*gw tokens."""
  b, n, d = hidden.shape
  if n < gh * gw:
    raise ValueError(f"{n} tokens cannot hold a {gh}x{gw} grid")
  return hidden[:, n - gh * gw:].reshape(b, gh, gw, d)


def build(name: str, *, dtype: Any = jnp.float32, seed: int = 0,
          **overrides) -> VisionTransformer:
  """Randomly initialised model from a preset (weights come from porting)."""
  return VisionTransformer(**vit_config(name, **overrides), dtype=dtype,
                           rngs=nnx.Rngs(seed))
