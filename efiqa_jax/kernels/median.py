"""Median of the valid entries of non-negative rows."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from efiqa_jax.kernels import switch


def masked_median_nonneg_plain(x: jax.Array, valid: jax.Array) -> jax.Array:
  """jnp.nanmedian of `where(valid, x, nan)` per row, 0 for an empty row."""
  med = jnp.nanmedian(jnp.where(valid, x.astype(jnp.float32), jnp.nan),
                      axis=1)
  return jnp.where(valid.any(axis=1), med, 0.0)


def masked_median_nonneg(x: jax.Array, valid: jax.Array) -> jax.Array:
  """Row-wise median of the valid entries of x (B, N) >= 0; 0 for an empty
  row.

  Fast form (every backend): bit for bit the plain form without its sort
  (XLA:CPU's comparator sort is slow): non-negative float32 order is their
  bits' int32 order, so each middle order statistic is found exactly by a
  31-step binary search on the bits, counting entries <= the midpoint.
  Its derivative is the plain form's (the bit search has none).
  Plain form: `masked_median_nonneg_plain`.
  """
  if not switch.enabled():
    return masked_median_nonneg_plain(x, valid)
  return _bit_search_median(x, valid)


@jax.custom_jvp
def _bit_search_median(x: jax.Array, valid: jax.Array) -> jax.Array:
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
  bits = jnp.where(valid, bits, jnp.iinfo(jnp.int32).max)
  n = valid.sum(axis=1, dtype=jnp.int32)
  # Ranks of the two middle entries (equal for an odd count).
  ranks = jnp.stack([(n - 1) // 2, n // 2], axis=1)  # (B, 2)

  def step(_, lohi):
    lo, hi = lohi
    mid = lo + (hi - lo) // 2
    count = (bits[:, None, :] <= mid[..., None]).sum(axis=2, dtype=jnp.int32)
    ge = count >= ranks + 1
    return jnp.where(ge, lo, mid + 1), jnp.where(ge, mid, hi)

  lo0 = jnp.zeros_like(ranks)
  hi0 = jnp.full_like(ranks, 0x7F800000)  # +inf
  _, hi = jax.lax.fori_loop(0, 31, step, (lo0, hi0))
  vals = jax.lax.bitcast_convert_type(hi, jnp.float32)
  med = jnp.where(n % 2 == 1, vals[:, 0], vals[:, 0] * 0.5 + vals[:, 1] * 0.5)
  return jnp.where(n > 0, med, 0.0)


@_bit_search_median.defjvp
def _bit_search_median_jvp(primals, tangents):
  x, valid = primals
  _, dy = jax.jvp(lambda v: masked_median_nonneg_plain(v, valid), (x,),
                  (tangents[0],))
  return _bit_search_median(x, valid), dy
