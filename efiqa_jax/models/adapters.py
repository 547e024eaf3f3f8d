"""Student adapters g_psi: frozen patch tokens Z (B, gh, gw, D) -> logits Q.

Positive logits mean "degraded" (the pseudo-labels' positive class is
low-quality), as in the reference `badish`.

  linear              `sc_linear`: one nn.Linear(D, 1) per token (a 1x1 conv);
                      EFIQA's adapter, D + 1 parameters.
  mlp                 per-token MLP D -> hidden -> 1 (GELU).
  modern_head_64to16  EFIQA-CP's `ModernHead64to16` (efiqa-method.md §4.2):
                      channel LN + 1x1 conv D->512; stage 1: 2 ConvNeXt blocks;
                      LN + 2x2/2 conv; stage 2: 2 blocks; LN + 2x2/2 conv;
                      stage 3: 1 block; LN + 1x1 conv -> 1. Block = 7x7
                      depthwise -> LN -> 1x1 (mlp_ratio) -> GELU -> 1x1 ->
                      layer-scale (init 1) -> drop-path -> residual; drop-path
                      rate scaled per stage (0.033/0.066/0.1 for 0.1).
                      Ported from FunPiQ `sa_cnn` by `efiqa port sa_cnn`.
                      64x64 tokens -> 16x16 logits (any grid divisible by 4).

Every adapter exposes ARCH + config() (efiqa_jax.checkpoints format) and
`__call__(z, *, key=None) -> (B, oh, ow)`; `key` is a PRNG key enabling the
stochastic parts (drop-path) during training, None = deterministic.
`output_grid(gh, gw)` gives (oh, ow).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


LN_EPS = 1e-6  # ConvNeXt's channel LayerNorm


class LinearAdapter(nnx.Module):
  """`sc_linear`: logits = z @ W.T + b on every token."""
  ARCH = "adapter_linear"

  def __init__(self, in_dim: int = 1024, *, dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
    self.in_dim = int(in_dim)
    self.dtype = jnp.dtype(dtype)
    self.linear = nnx.Linear(in_dim, 1, dtype=dtype, param_dtype=jnp.float32,
                             rngs=rngs)

  def config(self) -> dict:
    return dict(in_dim=self.in_dim, dtype=self.dtype.name)

  def output_grid(self, gh: int, gw: int) -> tuple[int, int]:
    return gh, gw

  def __call__(self, z: jax.Array, *, key=None) -> jax.Array:
    del key
    return self.linear(z.astype(self.dtype))[..., 0].astype(jnp.float32)


class MLPAdapter(nnx.Module):
  """Per-token D -> hidden -> 1 with GELU."""
  ARCH = "adapter_mlp"

  def __init__(self, in_dim: int = 1024, hidden: int = 256, *,
               dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.in_dim, self.hidden = int(in_dim), int(hidden)
    self.dtype = jnp.dtype(dtype)
    self.fc1 = nnx.Linear(in_dim, hidden, dtype=dtype,
                          param_dtype=jnp.float32, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, 1, dtype=dtype, param_dtype=jnp.float32,
                          rngs=rngs)

  def config(self) -> dict:
    return dict(in_dim=self.in_dim, hidden=self.hidden, dtype=self.dtype.name)

  def output_grid(self, gh: int, gw: int) -> tuple[int, int]:
    return gh, gw

  def __call__(self, z: jax.Array, *, key=None) -> jax.Array:
    del key
    h = jax.nn.gelu(self.fc1(z.astype(self.dtype)), approximate=False)
    return self.fc2(h)[..., 0].astype(jnp.float32)


def drop_path(x: jax.Array, rate: float, key) -> jax.Array:
  """Stochastic depth per sample (timm, scale_by_keep=True)."""
  if key is None or rate <= 0.0:
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep, 0.0).astype(x.dtype)


class ConvNeXtBlock(nnx.Module):

  def __init__(self, dim: int, mlp_ratio: float, drop_path_rate: float, *,
               dtype, rngs: nnx.Rngs):
    hidden = int(dim * mlp_ratio)
    self.dwconv = nnx.Conv(dim, dim, (7, 7), padding=3,
                           feature_group_count=dim, dtype=dtype,
                           param_dtype=jnp.float32, rngs=rngs)
    self.norm = nnx.LayerNorm(dim, epsilon=LN_EPS, dtype=dtype,
                              param_dtype=jnp.float32, rngs=rngs)
    self.pwconv1 = nnx.Linear(dim, hidden, dtype=dtype,
                              param_dtype=jnp.float32, rngs=rngs)
    self.pwconv2 = nnx.Linear(hidden, dim, dtype=dtype,
                              param_dtype=jnp.float32, rngs=rngs)
    self.gamma = nnx.Param(jnp.ones((dim,), jnp.float32))  # layer scale, init 1
    self.drop_path_rate = float(drop_path_rate)

  def __call__(self, x, key=None):
    h = self.dwconv(x)
    h = self.norm(h)
    h = jax.nn.gelu(self.pwconv1(h), approximate=False)
    h = self.pwconv2(h) * self.gamma[...].astype(h.dtype)
    return x + drop_path(h, self.drop_path_rate, key)


class Downsample(nnx.Module):

  def __init__(self, dim: int, *, dtype, rngs: nnx.Rngs):
    self.norm = nnx.LayerNorm(dim, epsilon=LN_EPS, dtype=dtype,
                              param_dtype=jnp.float32, rngs=rngs)
    self.conv = nnx.Conv(dim, dim, (2, 2), strides=(2, 2), padding="VALID",
                         dtype=dtype, param_dtype=jnp.float32, rngs=rngs)

  def __call__(self, x):
    return self.conv(self.norm(x))


class ModernHead64to16(nnx.Module):
  """EFIQA-CP's ConvNeXt-style head (`sa_cnn`); 5,390,849 params at D=1024."""
  ARCH = "modern_head_64to16"

  def __init__(self, in_dim: int = 1024, mid_channels: int = 512,
               mlp_ratio: float = 1.0, drop_path: float = 0.1,
               depths: tuple[int, ...] = (2, 2, 1), *,
               dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.in_dim, self.mid = int(in_dim), int(mid_channels)
    self.mlp_ratio, self.drop_path = float(mlp_ratio), float(drop_path)
    self.depths = tuple(int(d) for d in depths)
    self.dtype = jnp.dtype(dtype)
    c = self.mid
    self.stem_norm = nnx.LayerNorm(in_dim, epsilon=LN_EPS, dtype=dtype,
                                   param_dtype=jnp.float32, rngs=rngs)
    self.stem = nnx.Linear(in_dim, c, dtype=dtype, param_dtype=jnp.float32,
                           rngs=rngs)
    n = len(self.depths)
    stages, downs = {}, {}
    for s, depth in enumerate(self.depths):
      # Drop-path rate grows with the stage; the reference scales it by
      # 0.33 / 0.66 / 1 for three stages (else (s + 1) / n).
      scale = (0.33, 0.66, 1.0)[s] if n == 3 else (s + 1) / n
      rate = self.drop_path * scale
      # String keys: checkpoint paths are the same in memory and on disk.
      stages[str(s)] = nnx.Dict({
          str(j): ConvNeXtBlock(c, self.mlp_ratio, rate, dtype=dtype,
                                rngs=rngs)
          for j in range(depth)})
      if s < n - 1:
        downs[str(s)] = Downsample(c, dtype=dtype, rngs=rngs)
    self.stages = nnx.Dict(stages)
    self.downs = nnx.Dict(downs)
    self.head_norm = nnx.LayerNorm(c, epsilon=LN_EPS, dtype=dtype,
                                   param_dtype=jnp.float32, rngs=rngs)
    self.head = nnx.Linear(c, 1, dtype=dtype, param_dtype=jnp.float32,
                           rngs=rngs)

  def config(self) -> dict:
    return dict(in_dim=self.in_dim, mid_channels=self.mid,
                mlp_ratio=self.mlp_ratio, drop_path=self.drop_path,
                depths=list(self.depths), dtype=self.dtype.name)

  def output_grid(self, gh: int, gw: int) -> tuple[int, int]:
    f = 2 ** (len(self.depths) - 1)
    if gh % f or gw % f:
      raise ValueError(f"token grid {gh}x{gw} is not divisible by {f}")
    return gh // f, gw // f

  def __call__(self, z: jax.Array, *, key=None) -> jax.Array:
    if z.ndim != 4:
      raise ValueError(f"expected (B, gh, gw, D) tokens, got {z.shape}")
    self.output_grid(z.shape[1], z.shape[2])
    x = self.stem(self.stem_norm(z.astype(self.dtype)))
    n_blocks = sum(self.depths)
    keys = (jax.random.split(key, n_blocks) if key is not None
            else [None] * n_blocks)
    i = 0
    for s in range(len(self.depths)):
      for j in range(self.depths[s]):
        x = self.stages[str(s)][str(j)](x, keys[i])
        i += 1
      if str(s) in self.downs:
        x = self.downs[str(s)](x)
    return self.head(self.head_norm(x))[..., 0].astype(jnp.float32)


ADAPTERS = {
    "linear": LinearAdapter,
    "mlp": MLPAdapter,
    "modern_head_64to16": ModernHead64to16,
}
# Accepted config names -> class.
ALIASES = {"sc_linear": "linear", "sa_cnn": "modern_head_64to16",
           "cnn": "modern_head_64to16"}

def build_adapter(name: str, in_dim: int, *, seed: int = 0,
                  dtype: Any = jnp.float32, **kwargs) -> nnx.Module:
  """Adapter by config name (linear | mlp | modern_head_64to16 | aliases)."""
  key = ALIASES.get(name, name)
  if key not in ADAPTERS:
    raise ValueError(f"unknown adapter {name!r}; known: "
                     f"{sorted(ADAPTERS) + sorted(ALIASES)}")
  return ADAPTERS[key](in_dim, **kwargs, dtype=dtype, rngs=nnx.Rngs(seed))


def is_adapter_architecture(arch: str) -> bool:
  return arch in {c.ARCH for c in ADAPTERS.values()}
