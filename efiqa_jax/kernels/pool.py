"""2x2 stride-2 max-pool (NHWC)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from efiqa_jax.kernels import switch, xla_cpu


def max_pool_2x2_plain(x: jax.Array) -> jax.Array:
  """lax.reduce_window (nnx.max_pool's form); its gradient is XLA's
  select_and_scatter."""
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max,
                               (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 stride-2 max-pool, VALID (odd rows / columns dropped).

  Fast form (even H and W): reshape + max with a custom gradient, stored
  before its consumer (`xla_cpu.materialize`) because XLA:CPU would fuse the
  pool into the next conv's input and slow that conv down several times.
  Plain form: `max_pool_2x2_plain`. Both send a window's gradient to its
  first maximum in row-major order, as torch's max_pool2d does.
  """
  if not switch.enabled() or x.shape[1] % 2 or x.shape[2] % 2:
    return max_pool_2x2_plain(x)
  return xla_cpu.materialize(_pool(x))


@jax.custom_vjp
def _pool(x):
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _pool_fwd(x):
  y = _pool(x)
  return y, (x, y)


def _pool_bwd(res, g):
  # Elementwise selects; the reshape-max's own gradient counts ties with
  # slow reductions, reduce_window's is a slow select_and_scatter on CPU.
  x, y = res
  b, h, w, c = x.shape
  xr = x.reshape(b, h // 2, 2, w // 2, 2, c)
  y, g = y[:, :, None, :, None, :], g[:, :, None, :, None, :]
  zero = jnp.zeros((), g.dtype)
  taken = None
  rows = []
  for i in range(2):
    cols = []
    for j in range(2):
      hit = xr[:, :, i:i + 1, :, j:j + 1, :] == y
      if taken is not None:
        hit = hit & ~taken
      taken = hit if taken is None else taken | hit
      cols.append(jnp.where(hit, g, zero))
    rows.append(jnp.concatenate(cols, axis=4))
  return (jnp.concatenate(rows, axis=2).reshape(b, h, w, c),)


_pool.defvjp(_pool_fwd, _pool_bwd)
