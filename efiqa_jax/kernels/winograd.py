"""3x3 stride-1 'same' convolution by Winograd minimal filtering (NHWC, HWIO).

F(m x m, 3 x 3) (Lavin & Gray 2016): the padded input is cut into overlapping
(m + 2) x (m + 2) tiles with stride m; each tile and the kernel are moved into
the transform domain (B^T d B, G g G^T), multiplied point-wise, which over the
channels is one batched matmul ((m + 2)^2 batches of (tiles, Cin) x (Cin, Cout),
large GEMMs), and brought back (A^T M A) to an
m x m output block. Multiplies per output: 9 (direct) -> 4 (m = 2) or
2.25 (m = 4).

The input and output transforms are written as sums of strided slices with
the constant coefficients folded in (no multiply for 0 or +-1), so each is
one elementwise XLA fusion, separable: rows first, then columns. The kernel
transform (and its adjoint) is one small constant matmul over the 9 taps.

Float32 error: m = 2 uses coefficients 0, +-1, +-1/2 and is nearly as exact as
direct summation; m = 4 has coefficients up to 8 and 1/24 and loses about one
more decimal digit (tests/test_winograd.py).
"""
from __future__ import annotations

from fractions import Fraction as F
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# (B^T, G, A^T) for F(2, 3) and F(4, 3), the standard Lavin & Gray points
# (0, +-1, [+-2, +-1/2 for m = 4], inf), exact as fractions.
_MATS = {
    2: (
        [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        [[1, 0, 0], [F(1, 2), F(1, 2), F(1, 2)], [F(1, 2), F(-1, 2), F(1, 2)],
         [0, 0, 1]],
        [[1, 1, 1, 0], [0, 1, -1, -1]],
    ),
    4: (
        [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
         [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
        [[F(1, 4), 0, 0], [F(-1, 6), F(-1, 6), F(-1, 6)],
         [F(-1, 6), F(1, 6), F(-1, 6)], [F(1, 24), F(1, 12), F(1, 6)],
         [F(1, 24), F(-1, 12), F(1, 6)], [0, 0, 1]],
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
         [0, 1, -1, 8, -8, 1]],
    ),
}

TILES = tuple(_MATS)


def _combine(terms: Sequence[jax.Array], coeffs: Sequence) -> jax.Array:
  """sum_k coeffs[k] * terms[k], skipping zeros and multiplies by +-1."""
  out = None
  for t, c in zip(terms, coeffs):
    if c == 0:
      continue
    if c in (1, -1):
      v, sign = t, c
    else:
      v, sign = t * jnp.asarray(float(abs(c)), t.dtype), (1 if c > 0 else -1)
    if out is None:
      out = v if sign > 0 else -v
    else:
      out = out + v if sign > 0 else out - v
  return out


def _check_m(m: int):
  if m not in _MATS:
    raise ValueError(f"Winograd tile m must be one of {TILES}, got {m}")


def num_tiles(h: int, w: int, m: int) -> tuple[int, int]:
  return -(-h // m), -(-w // m)


def input_transform(x: jax.Array, m: int) -> jax.Array:
  """(B, H, W, C) -> V (t*t, B*nh*nw, C), t = m + 2, zero 'same' padding.

  Tiles past the bottom / right edge (H or W not a multiple of m) read zeros.
  """
  _check_m(m)
  bt = _MATS[m][0]
  t = m + 2
  b, h, w, c = x.shape
  nh, nw = num_tiles(h, w, m)
  xp = jnp.pad(x, ((0, 0), (1, nh * m + 1 - h), (1, nw * m + 1 - w), (0, 0)))
  # Rows: tile i's k-th row is padded row m*i + k.
  rows = [xp[:, k:k + m * (nh - 1) + 1:m] for k in range(t)]
  rt = [_combine(rows, bt[a]) for a in range(t)]        # t x (B, nh, Wp, C)
  out = []
  for r in rt:
    cols = [r[:, :, k:k + m * (nw - 1) + 1:m] for k in range(t)]
    out.extend(_combine(cols, bt[a]) for a in range(t))  # (B, nh, nw, C)
  return jnp.stack(out).reshape(t * t, b * nh * nw, c)


def _kernel_matrix(m: int) -> np.ndarray:
  """(t*t, 9) float32: vec(G g G^T) = (G kron G) vec(g), exact in float64."""
  g = np.array([[float(v) for v in row] for row in _MATS[m][1]])
  return np.kron(g, g).astype(np.float32)


def kernel_transform(wk: jax.Array, m: int) -> jax.Array:
  """(3, 3, Cin, Cout) -> U (t*t, Cin, Cout) = G g G^T per channel pair.

  One (t*t, 9) x (9, Cin*Cout) product, so the weights are read once (it
  runs at every forward)."""
  _check_m(m)
  k = jnp.asarray(_kernel_matrix(m), wk.dtype)
  return jnp.einsum("pk,kcd->pcd", k, wk.reshape(9, *wk.shape[2:]),
                    preferred_element_type=jnp.float32).astype(wk.dtype)


def output_transform(mm: jax.Array, m: int, shape: tuple[int, int, int]
                     ) -> jax.Array:
  """M (t*t, B*nh*nw, D) -> (B, H, W, D) = A^T M A per tile, cropped."""
  _check_m(m)
  at = _MATS[m][2]
  t = m + 2
  b, h, w = shape
  nh, nw = num_tiles(h, w, m)
  d = mm.shape[-1]
  mm = mm.reshape(t, t, b, nh, nw, d)
  rows = [_combine([mm[a] for a in range(t)], at[i]) for i in range(m)]
  blocks = [[_combine([r[k] for k in range(t)], at[j]) for j in range(m)]
            for r in rows]                                # m x m (B, nh, nw, D)
  y = jnp.stack([jnp.stack(bj, axis=3) for bj in blocks], axis=2)
  y = y.reshape(b, nh * m, nw * m, d)                     # (B, nh, m, nw, m, D)
  return y[:, :h, :w]


def output_transform_transpose(g: jax.Array, m: int) -> jax.Array:
  """Adjoint of `output_transform`: (B, H, W, D) -> dM (t*t, B*nh*nw, D)."""
  _check_m(m)
  at = _MATS[m][2]
  t = m + 2
  b, h, w, d = g.shape
  nh, nw = num_tiles(h, w, m)
  g = jnp.pad(g, ((0, 0), (0, nh * m - h), (0, nw * m - w), (0, 0)))
  g = g.reshape(b, nh, m, nw, m, d)
  gy = [[g[:, :, i, :, j] for j in range(m)] for i in range(m)]
  # dM[a, c] = sum_ij A^T[i, a] A^T[j, c] gY[i, j]
  rows = [[_combine([gy[i][j] for i in range(m)], [at[i][a] for i in range(m)])
           for j in range(m)] for a in range(t)]
  out = [_combine(rows[a], [at[j][c] for j in range(m)]) for a in range(t)
         for c in range(t)]
  return jnp.stack(out).reshape(t * t, b * nh * nw, d)


def kernel_transform_transpose(du: jax.Array, m: int) -> jax.Array:
  """Adjoint of `kernel_transform`: dU (t*t, Cin, Cout) -> (3, 3, Cin, Cout)."""
  _check_m(m)
  k = jnp.asarray(_kernel_matrix(m), du.dtype)
  dw = jnp.einsum("pk,pcd->kcd", k, du, preferred_element_type=jnp.float32)
  return dw.astype(du.dtype).reshape(3, 3, *du.shape[1:])


def transformed_matmul(v: jax.Array, u: jax.Array) -> jax.Array:
  """(t*t, N, C) x (t*t, C, D) -> (t*t, N, D), float32 accumulation."""
  return jnp.einsum("pnc,pcd->pnd", v, u, preferred_element_type=jnp.float32
                    ).astype(v.dtype)


def conv3x3(x: jax.Array, wk: jax.Array, m: int = 2) -> jax.Array:
  """Stride-1 'same' 3x3 cross-correlation, as lax.conv_general_dilated with
  padding 1 and NHWC / HWIO; any H, W >= 1 and channel counts."""
  if wk.shape[:2] != (3, 3) or x.shape[-1] != wk.shape[2]:
    raise ValueError(f"need a (3, 3, {x.shape[-1]}, Cout) kernel, got "
                     f"{wk.shape}")
  b, h, w, _ = x.shape
  v = input_transform(x, m)
  u = kernel_transform(wk.astype(x.dtype), m)
  return output_transform(transformed_matmul(v, u), m, (b, h, w))


def weight_grad(v: jax.Array, g: jax.Array, m: int) -> jax.Array:
  """d(loss)/d(kernel) (3, 3, Cin, Cout) of `conv3x3` from the forward's
  transformed input V and the output gradient g (B, H, W, Cout)."""
  dm = output_transform_transpose(g, m)
  du = jnp.einsum("pnc,pnd->pcd", v, dm, preferred_element_type=jnp.float32)
  return kernel_transform_transpose(du, m)


def input_transform_transpose(dv: jax.Array, m: int,
                              shape: tuple[int, int, int, int]) -> jax.Array:
  """Adjoint of `input_transform`: dV (t*t, B*nh*nw, C) -> (B, H, W, C).

  Overlapping tiles add up; written as the transpose JAX derives for the
  strided slices (interior-padded pads, summed in one fusion)."""
  zeros = jnp.zeros(shape, dv.dtype)
  return jax.linear_transpose(lambda x: input_transform(x, m), zeros)(dv)[0]
