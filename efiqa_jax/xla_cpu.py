"""Helpers for XLA:CPU's fusion decisions (no-ops on other backends)."""
from __future__ import annotations

import jax


def materialize(x: jax.Array) -> jax.Array:
  """x, computed once and stored before its consumers run (XLA:CPU only).

  XLA:CPU fuses a producer into its consumers, also where that costs more
  than storing it: into every shifted tap of a stencil (the vessel
  segmenter's ridge response was evaluated ~3 times per pixel), or as the
  input of a library convolution (the U-Net's 2x2 max-pool fused into the
  next conv made that conv 3-4x slower). A conditional is a fusion boundary
  that XLA keeps (an optimization_barrier is removed before fusion on CPU);
  both branches return x bit for bit (-(-x) == x, NaN included), so the
  predicate only has to be data-dependent. Differentiable (cond)."""
  if jax.default_backend() != "cpu":
    return x
  first = x.reshape(-1)[0]
  return jax.lax.cond(first == first, lambda v: v, lambda v: -(-v), x)
