"""Convolutions of the U-Net: 'same' k x k, 1x1, and 2x2 stride-2 transposed
(NHWC activations, HWIO kernels).

Plain forms are lax's convolutions with XLA's own gradients. Fast forms:
  conv2d_same on XLA:CPU  per-layer plan (`conv_plan`): Winograd for deep
                          layers, and a custom gradient (XLA:CPU computes a
                          conv's weight gradient as a conv whose kernel is the
                          whole output gradient, several times the forward);
  conv1x1                 a matmul over channels (every backend);
  conv_transpose_2x2      one matmul + depth-to-space (every backend; XLA:CPU
                          runs the lhs-dilated conv on a slow generic path).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from efiqa_jax.kernels import switch, winograd

_DN = ("NHWC", "HWIO", "NHWC")

# Per-layer 3x3 plan on XLA:CPU (bench/README.md, U-Net): Winograd forward and
# input gradient when min(Cin, Cout) >= WINOGRAD_MIN_CHANNELS (direct convs are
# memory-bound and faster on wide maps with few channels), Winograd weight
# gradient whenever Cin >= WINOGRAD_DW_MIN_CIN.
WINOGRAD_MIN_CHANNELS = 256
WINOGRAD_DW_MIN_CIN = 16


def conv2d_same_plain(x: jax.Array, w: jax.Array) -> jax.Array:
  """Stride-1 conv with padding k // 2: lax.conv_general_dilated."""
  p = w.shape[0] // 2
  return jax.lax.conv_general_dilated(x, w, (1, 1), ((p, p), (p, p)),
                                      dimension_numbers=_DN)


def conv2d_same(x: jax.Array, w: jax.Array) -> jax.Array:
  """Stride-1 'same' conv (odd k x k, padding k // 2), NHWC x HWIO.

  Fast forms: 1x1 as a matmul; on XLA:CPU `conv2d_same_cpu` (Winograd per
  `conv_plan`, custom gradient). Plain form: `conv2d_same_plain`.
  """
  if w.shape[0] % 2 != 1 or w.shape[0] != w.shape[1]:
    raise ValueError(f"need an odd square kernel, got {w.shape}")
  if not switch.enabled():
    return conv2d_same_plain(x, w)
  if w.shape[:2] == (1, 1):
    return conv1x1(x, w)
  if switch.on_cpu():
    return conv2d_same_cpu(x, w)
  return conv2d_same_plain(x, w)  # cuDNN / TPU convs are fastest plain


def conv1x1(x: jax.Array, w: jax.Array) -> jax.Array:
  """1x1 conv, w (1, 1, Cin, Cout). Fast form: a matmul over channels
  (XLA:CPU runs a 1x1 conv with few output channels slowly)."""
  if not switch.enabled():
    return conv2d_same_plain(x, w)
  return jnp.einsum("bhwc,cd->bhwd", x, w[0, 0])


def conv_transpose_2x2(x: jax.Array, w: jax.Array) -> jax.Array:
  """2x2 stride-2 transposed conv, padding VALID, kernel (2, 2, in, out) in
  nnx.ConvTranspose's convention (transpose_kernel=False, not flipped).

  Fast form: with stride == kernel size output pixel (2h+i, 2w+j) sees only
  input pixel (h, w), through tap (1-i, 1-j): one row-major
  (B*H*W, in) x (in, 4*out) matmul, then depth-to-space.
  Plain form: lax.conv_transpose.
  """
  if not switch.enabled():
    return jax.lax.conv_transpose(x, w, (2, 2), "VALID",
                                  dimension_numbers=_DN)
  b, h, wd, cin = x.shape
  cout = w.shape[-1]
  k2 = w[::-1, ::-1].transpose(2, 0, 1, 3).reshape(cin, 4 * cout)
  y = jnp.dot(x.reshape(b * h * wd, cin), k2)
  y = y.reshape(b, h, wd, 2, 2, cout).transpose(0, 1, 3, 2, 4, 5)
  return y.reshape(b, 2 * h, 2 * wd, cout)


def conv_plan(x_shape: tuple[int, ...], w_shape: tuple[int, ...],
              dtype: Any = jnp.float32) -> tuple[int | None, int | None]:
  """(forward / input-gradient Winograd tile m or None for XLA's direct conv,
  weight-gradient Winograd tile m or None for per-tap matmuls)."""
  k, _, cin, cout = w_shape
  # Winograd's coefficients (up to 8 and 1/24) are only checked to keep
  # float32 within the parity bounds; other dtypes stay direct.
  if k != 3 or jnp.dtype(dtype) != jnp.float32:
    return None, None
  # F(4x4, 3x3)'s larger (36, Cin, Cout) kernel transform does not pay on
  # maps below 32 px.
  m = 4 if min(x_shape[1], x_shape[2]) >= 32 else 2
  fwd = m if min(cin, cout) >= WINOGRAD_MIN_CHANNELS else None
  dw = m if cin >= WINOGRAD_DW_MIN_CIN else None
  return fwd, dw


def _num_chunks(n: int) -> int:
  # Up to 16 chunks of >= 1024 rows: one matmul with a huge contraction and
  # a small Cin x Cout output parallelises badly.
  for p in (16, 8, 4, 2):
    if n % p == 0 and n // p >= 1024:
      return p
  return 1


def _sum_leading(a: jax.Array) -> jax.Array:
  # An unrolled add chain is one loop fusion; XLA:CPU's reduce over the
  # leading axis is a much slower library call.
  acc = a[0]
  for i in range(1, a.shape[0]):
    acc = acc + a[i]
  return acc


def conv_weight_grad_taps(x: jax.Array, g: jax.Array, k: int) -> jax.Array:
  """d(loss)/d(kernel) (k, k, Cin, Cout) of a stride-1 'same' k x k conv:
  per tap, a shifted input slice contracted with the output gradient over
  B*H*W in chunks (a batched matmul, then a sum)."""
  b, h, w, c = x.shape
  d = g.shape[-1]
  pad = k // 2
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

  def tap(u, v):
    n = _num_chunks(u.shape[0] * u.shape[1] * u.shape[2])
    return _sum_leading(jnp.einsum(
        "pkc,pkd->pcd", u.reshape(n, -1, u.shape[-1]),
        v.reshape(n, -1, v.shape[-1]), preferred_element_type=jnp.float32))

  # Tap (i, j) pairs xp[:, i + y, j + x] with g[:, y, x]; the shifted copies
  # are made of the side with fewer channels.
  if c <= d:
    taps = [tap(xp[:, i:i + h, j:j + w], g)
            for i in range(k) for j in range(k)]
  else:
    taps = [tap(xp, jnp.pad(g, ((0, 0), (i, 2 * pad - i), (j, 2 * pad - j),
                                (0, 0))))
            for i in range(k) for j in range(k)]
  return jnp.stack(taps).reshape(k, k, c, d)


@jax.custom_vjp
def conv2d_same_cpu(x: jax.Array, w: jax.Array) -> jax.Array:
  """`conv2d_same` for XLA:CPU: XLA's or Winograd's per `conv_plan`, with a
  custom gradient."""
  return _cpu_fwd(x, w)[0]


def _cpu_fwd(x, w):
  m, _ = conv_plan(x.shape, w.shape, x.dtype)
  if m is None:
    return conv2d_same_plain(x, w), (x, w, None, None)
  v = winograd.input_transform(x, m)
  u = winograd.kernel_transform(w, m)
  y = winograd.output_transform(winograd.transformed_matmul(v, u), m,
                                x.shape[:3])
  return y, (None, w, v, u)  # the backward needs V and U, not x


def _cpu_bwd(res, g):
  x, w, v, u = res
  if v is not None:
    # All in the transform domain: dM = A dY A^T is shared by
    # dX = B (dM U^T) B^T and dU = V^T dM.
    m, _ = conv_plan(g.shape[:3] + (w.shape[2],), w.shape, v.dtype)
    dm = winograd.output_transform_transpose(g, m)
    dv = jnp.einsum("pnd,pcd->pnc", dm, u,
                    preferred_element_type=jnp.float32).astype(g.dtype)
    dx = winograd.input_transform_transpose(dv, m,
                                            g.shape[:3] + (w.shape[2],))
    du = jnp.einsum("pnc,pnd->pcd", v, dm, preferred_element_type=jnp.float32)
    return dx, winograd.kernel_transform_transpose(du, m).astype(w.dtype)
  # The input gradient of the shallow layers is a conv XLA:CPU runs fast.
  dx = jax.vjp(lambda x_: conv2d_same_plain(x_, w), x)[1](g)[0]
  _, mw = conv_plan(x.shape, w.shape, x.dtype)
  if mw is None:
    dw = conv_weight_grad_taps(x, g, w.shape[0])
  else:
    dw = winograd.weight_grad(winograd.input_transform(x, mw), g, mw)
  return dx, dw.astype(w.dtype)


conv2d_same_cpu.defvjp(_cpu_fwd, _cpu_bwd)
