"""Helpers around XLA:CPU's fusion and temporary-buffer behaviour (no-ops on
other backends)."""
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


def map_examples(fn, *arrays):
  """fn(*arrays) over the leading (batch) axis, one example at a time on
  XLA:CPU (lax.map, i.e. a loop inside the same jitted call); fn(*arrays)
  elsewhere. fn maps (1, ...) arrays to a (1, ...) array or tuple.

  XLA:CPU allocates one slab for all temporaries of an execution. Above
  glibc's largest mmap threshold (32 MB) it comes fresh from the kernel at
  every call and is page-faulted in again: the default model's maps of 8
  photographs at 512 px had ~4800 faults (19 MB) and 8 ms of system time per
  photograph. One example at a time keeps the slab near 20 MB, reused from
  the heap: maps 23 -> 21 ms per photograph, CPU time 43 -> 37 ms (the rest
  goes to the decode threads in `efiqa assess`: 24 -> 27 img/s). Memory no
  longer grows with the batch either."""
  if jax.default_backend() != "cpu" or arrays[0].shape[0] == 1:
    return fn(*arrays)
  one = jax.lax.map(lambda xs: fn(*(x[None] for x in xs)), arrays)
  return jax.tree.map(lambda y: y.reshape(y.shape[0], *y.shape[2:]), one)
