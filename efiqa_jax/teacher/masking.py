"""Progressive grid masking of VUAD (EFIQA §1.3, reference `ProgressiveDegrade`).

Runs on device inside the jitted train step. Per sample: a grid resolution K is
drawn uniformly from {k_min..k_max}, a masking ratio gamma ~ U[min_ratio,
max_ratio], a coarse KxK grid keeps each cell where `uniform > gamma` (so gamma
is the masked fraction), and the coarse grid is upsampled to HxW with the same
nearest-neighbour index rule as torch `F.interpolate(mode='nearest')`:
src = min(floor(dst * (K / H)), K - 1), computed in float32 like torch
(as a host-side lookup table indexed by the traced K).

Shapes are static: the coarse grid is always drawn at (k_max, k_max) and only
its first K rows/columns are ever indexed, so K can vary per sample without
recompiling.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


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


@functools.lru_cache(maxsize=64)
def _nearest_table(k_max: int, size: int) -> np.ndarray:
  """(k_max + 1, size) source indices, computed on the host in float32 exactly
  like torch (`(float)in / out`, then `floor(dst * scale)`), so that XLA's
  algebraic rewrites (x / c -> x * (1 / c)) cannot shift a boundary pixel."""
  table = np.zeros((k_max + 1, size), np.int32)
  dst = np.arange(size, dtype=np.float32)
  for k in range(1, k_max + 1):
    scale = np.float32(k) / np.float32(size)
    src = np.floor(dst * scale).astype(np.int64)
    table[k] = np.minimum(src, k - 1)
  return table


def nearest_indices(k: jax.Array, size: int, k_max: int = 32) -> jax.Array:
  """Source index of every output pixel for nearest upsampling of K -> size.

  k: (B,) int32 in [1, k_max]. Returns (B, size) int32 with torch
  `F.interpolate(mode='nearest')` semantics.
  """
  return jnp.asarray(_nearest_table(int(k_max), int(size)))[k]


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
  rows = nearest_indices(k, height, k_max)  # (B,H)
  cols = nearest_indices(k, width, k_max)  # (B,W)
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
