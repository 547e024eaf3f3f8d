"""XLA:CPU fusion and temporary-buffer workarounds (identity elsewhere, and
with kernels off)."""
from __future__ import annotations

import jax

from efiqa_jax.kernels import switch


def materialize(x: jax.Array) -> jax.Array:
  """x, computed once and stored before its consumers run (XLA:CPU only).

  Why: XLA:CPU fuses a producer into each consumer even when that recomputes
  it many times (every tap of a stencil, the input of a library conv). A
  `cond` is a fusion boundary XLA:CPU keeps (it drops optimization_barrier);
  both branches return x bit for bit (-(-x) == x, NaN included), so the
  predicate only has to be data-dependent. Differentiable.
  Plain form: x.
  """
  if not (switch.enabled() and switch.on_cpu()):
    return x
  first = x.reshape(-1)[0]
  return jax.lax.cond(first == first, lambda v: v, lambda v: -(-v), x)


def map_examples(fn, *arrays):
  """fn(*arrays), run one example at a time (lax.map) on XLA:CPU.

  Why: XLA:CPU allocates one slab for an execution's temporaries; above
  glibc's mmap threshold it is page-faulted in afresh at every call, per
  example it stays small and is reused. fn maps (1, ...) arrays to a
  (1, ...) array or a tuple of them. Plain form: fn(*arrays).
  """
  if (not (switch.enabled() and switch.on_cpu())
      or arrays[0].shape[0] == 1):
    return fn(*arrays)
  one = jax.lax.map(lambda xs: fn(*(x[None] for x in xs)), arrays)
  return jax.tree.map(lambda y: y.reshape(y.shape[0], *y.shape[2:]), one)
