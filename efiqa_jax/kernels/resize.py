"""Linear antialiased resize of (B, H, W) arrays, as jax.image.resize."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from efiqa_jax.kernels import switch


def resize_linear_plain(x: jax.Array, h: int, w: int) -> jax.Array:
  """jax.image.resize(x, (B, h, w), "linear", antialias=True)."""
  return jax.image.resize(x, (x.shape[0], h, w), method="linear",
                          antialias=True)


def resize_linear(x: jax.Array, h: int, w: int) -> jax.Array:
  """(B, H, W) -> (B, h, w), linear with antialiasing.

  Fast form (every backend): the same weights (`_resize_taps`) applied as a
  few shifted slices per axis, where jax's dense (in x out) weight matrices
  make XLA:CPU run a matmul over all inputs for 2-8 nonzero taps; equal up to
  float32 summation order. Ratios without a periodic band (e.g. 515 -> 133)
  and kernels off: `resize_linear_plain`.
  """
  _, hi, wi = x.shape
  if not switch.enabled() or (h != hi and _resize_taps(hi, h) is None) or (
      w != wi and _resize_taps(wi, w) is None):
    return resize_linear_plain(x, h, w)
  return _resize_axis(_resize_axis(x, h, 1), w, 2)


@functools.lru_cache(maxsize=None)
def _resize_taps(n_in: int, n_out: int):
  """Nonzero weights of jax.image.scale_and_translate's linear antialiased
  weight matrix for one axis (same formula, float32 like jax's):
  (phases u, input step per output of a phase, per phase r (start, weights
  (taps, n_out // u)), taps), or None when the band is not periodic."""
  f32 = np.float32
  inv = f32(1.0) / f32(n_out / n_in)
  kscale = max(inv, f32(1.0))
  sample = (np.arange(n_out, dtype=f32) + f32(0.5)) * inv - f32(0.5)
  x = np.abs(sample[None, :] - np.arange(n_in, dtype=f32)[:, None]) / kscale
  w = np.maximum(f32(0.0), f32(1.0) - x)
  tot = w.sum(axis=0, keepdims=True, dtype=f32)
  w = np.where(np.abs(tot) > 1000.0 * float(np.finfo(np.float32).eps),
               w / np.where(tot != 0, tot, f32(1.0)), f32(0.0))
  w = np.where(((sample >= -0.5) & (sample <= n_in - 0.5))[None], w,
               f32(0.0)).astype(f32)  # (n_in, n_out)
  # Nominal (unclipped) band of each output: inputs within the kernel's
  # support; indices outside [0, n_in) get weight 0 (read from padding).
  lo = (np.floor(sample.astype(np.float64) - kscale) + 1).astype(np.int64)
  top = np.floor(sample.astype(np.float64) + kscale).astype(np.int64)
  taps = int(max(1, (top - lo).max() + 1))
  j = np.arange(n_out)
  idx = lo[None, :] + np.arange(taps)[:, None]  # (taps, n_out)
  inside = (idx >= 0) & (idx < n_in)
  wt = np.where(inside, w[np.clip(idx, 0, n_in - 1), j[None, :]],
                f32(0.0)).astype(f32)
  # The weights outside the band must be zero, or the band is wrong.
  band = np.zeros_like(w)
  np.add.at(band, (np.clip(idx, 0, n_in - 1), np.broadcast_to(j, idx.shape)),
            wt)
  if not np.array_equal(band, w):
    raise AssertionError(f"resize band {n_in} -> {n_out} misses weights")
  # Output phases r::u whose start index grows by a constant step: slices.
  for u in range(1, 9):
    if n_out % u:
      continue
    steps = [np.diff(lo[r::u]) for r in range(u)]
    step = int(steps[0][0]) if len(steps[0]) else 1
    if step >= 1 and all(len(d) == 0 or (d == step).all() for d in steps):
      return u, step, tuple((int(lo[r]), wt[:, r::u]) for r in range(u)), taps
  return None  # irregular ratio: jax's dense weights


def _resize_axis(x: jax.Array, n_out: int, axis: int) -> jax.Array:
  n_in = x.shape[axis]
  if n_in == n_out:
    return x
  u, step, phases, taps = _resize_taps(n_in, n_out)
  m = n_out // u  # outputs per phase
  left = max(0, -min(a for a, _ in phases))
  need = max(a + (m - 1) * step + taps for a, _ in phases)
  pad = [(0, 0)] * x.ndim
  pad[axis] = (left, max(0, need - n_in))
  xp = jnp.pad(x, pad)  # only zero-weight taps read the padding
  shape = [1] * x.ndim
  shape[axis] = m
  outs = []
  for a, wt in phases:
    acc = None
    for t in range(taps):
      wv = wt[t]
      if not wv.any():
        continue
      sl = jax.lax.slice_in_dim(xp, left + a + t,
                                left + a + t + (m - 1) * step + 1,
                                stride=step, axis=axis)
      term = sl * jnp.asarray(wv.reshape(shape))
      acc = term if acc is None else acc + term
    outs.append(acc if acc is not None else jnp.zeros(
        x.shape[:axis] + (m,) + x.shape[axis + 1:], x.dtype))
  if u == 1:
    return outs[0]
  # Interleave the phases: output u*i + r comes from phase r, position i.
  y = jnp.stack(outs, axis=axis + 1)
  return y.reshape(x.shape[:axis] + (n_out,) + x.shape[axis + 1:])
