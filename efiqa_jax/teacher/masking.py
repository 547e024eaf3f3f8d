"""Progressive grid masking of VUAD (EFIQA §1.3, reference `ProgressiveDegrade`).

Runs on device inside the jitted train step. Per sample: a grid resolution K is
drawn uniformly from {k_min..k_max}, a masking ratio gamma ~ U[min_ratio,
max_ratio], a coarse KxK grid keeps each cell where `uniform > gamma` (so gamma
is the masked fraction), and the coarse grid is upsampled to HxW with the same
nearest-neighbour index rule as torch `F.interpolate(mode='nearest')`:
src = min(floor(dst * (K / H)), K - 1), computed in float32 like torch.

Shapes are static: the coarse grid is always drawn at (k_max, k_max) and only
its first K rows/columns are ever indexed, so K can vary per sample without
recompiling.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def min_ratio_schedule(epoch, *, init_min: float = 0.8, final_min: float = 0.0,
                       transition_start: float = 20,
                       transition_end: float = 80):
  """Lower bound of the masking-ratio range at (0-based) `epoch`.

  init_min before transition_start, linear to final_min at transition_end,
  final_min after (reference: min_ratio = 0.8 * (1 - (e - 20) / 60)).
  Works on Python/numpy numbers and on traced jax scalars.
  """
  span = max(float(transition_end) - float(transition_start), 1e-9)
  alpha = (epoch - transition_start) / span
  alpha = jnp.clip(alpha, 0.0, 1.0) if isinstance(epoch, jax.Array) else min(
      max(alpha, 0.0), 1.0)
  return init_min + (final_min - init_min) * alpha


def nearest_indices(k: jax.Array, size: int) -> jax.Array:
  """Source index of every output pixel for nearest upsampling of K -> size.

  k: (B,) int32. Returns (B, size) int32, torch `mode='nearest'` semantics.
  """
  scale = k.astype(jnp.float32) / jnp.float32(size)  # (B,)
  dst = jnp.arange(size, dtype=jnp.float32)
  src = jnp.floor(dst[None, :] * scale[:, None]).astype(jnp.int32)
  return jnp.minimum(src, k[:, None] - 1)


def sample_grid_mask(rng: jax.Array, batch: int, height: int, width: int, *,
                     min_ratio, max_ratio=1.0, k_min: int = 4, k_max: int = 32):
  """Draws per-sample keep masks.

  Returns (keep (B,H,W) float32 with 1 = visible, k (B,) int32, gamma (B,)).
  """
  rk, rg, ru = jax.random.split(rng, 3)
  k = jax.random.randint(rk, (batch,), k_min, k_max + 1, dtype=jnp.int32)
  gamma = jax.random.uniform(rg, (batch,), jnp.float32, 0.0, 1.0)
  gamma = min_ratio + (max_ratio - min_ratio) * gamma
  coarse = jax.random.uniform(ru, (batch, k_max, k_max), jnp.float32)
  keep_coarse = coarse > gamma[:, None, None]
  rows = nearest_indices(k, height)  # (B,H)
  cols = nearest_indices(k, width)  # (B,W)
  b = jnp.arange(batch)[:, None, None]
  keep = keep_coarse[b, rows[:, :, None], cols[:, None, :]]
  return keep.astype(jnp.float32), k, gamma


def apply_grid_mask(rng: jax.Array, x: jax.Array, *, min_ratio, max_ratio=1.0,
                    k_min: int = 4, k_max: int = 32):
  """Masks x (B,H,W,C): every channel of a masked cell is set to 0.

  Returns (x_masked, info) with info = {'keep', 'k', 'gamma'}.
  """
  bsz, h, w, _ = x.shape
  keep, k, gamma = sample_grid_mask(rng, bsz, h, w, min_ratio=min_ratio,
                                    max_ratio=max_ratio, k_min=k_min,
                                    k_max=k_max)
  return x * keep[..., None].astype(x.dtype), dict(keep=keep, k=k, gamma=gamma)
