"""The 5-level U-Net of VUAD (`unet_res`) and RRWNet, in Flax NNX (NHWC).

Layer for layer the reference `UNetModule` (penway/EFIQA `vuad/model/unet.py`,
identical to j-morano/rrwnet `model.py`):

  encoder  conv1..conv5: two 3x3 convs (padding 1, bias) + ReLU each, widths
           base x1, x2, x4, x8, x16, 2x2 max-pool between levels;
  decoder  upconvK: 2x2 stride-2 transposed conv (bias) halving the width,
           concatenation [skip, upsampled] (skip first, as torch.cat((x4, x))),
           conv6..conv9: two 3x3 convs + ReLU;
  outconv  1x1 conv (bias).

`UNet(residual=True)` is `unet_res`: x + f(x). Its `activf=nn.SiLU` argument is
never forwarded in the reference, so the activation is ReLU there too.

Attribute names mirror the torch module (conv1.conv1, upconv1, outconv) so the
porting table in `efiqa_jax.port.vuad` reads one-to-one. Parameters are float32
by default; `dtype` is the compute dtype (e.g. jnp.bfloat16). Initialisation
follows torch's defaults (uniform +-1/sqrt(fan_in) for weights and biases) so
that training from scratch starts like the reference.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from efiqa_jax import xla_cpu
from efiqa_jax.models import winograd

# Number of 2x2 poolings: H and W must be multiples of 2**4 = 16.
NUM_POOLS = 4


def _torch_bias_init(fan_in: int):
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


# torch's kaiming_uniform_(a=sqrt(5)) == uniform(+-1/sqrt(fan_in)).
_torch_kernel_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in",
                                                       "uniform")
# torch computes a ConvTranspose2d fan_in from weight dim 1 (= out channels)
# times the kernel area; flax's transposed kernel is (kh, kw, in, out).
_torch_tkernel_init = nnx.initializers.variance_scaling(
    1.0 / 3.0, "fan_in", "uniform", in_axis=-1, out_axis=-2)


_DN = ("NHWC", "HWIO", "NHWC")


def _conv_same(x: jax.Array, w: jax.Array) -> jax.Array:
  p = w.shape[0] // 2
  return jax.lax.conv_general_dilated(x, w, (1, 1), ((p, p), (p, p)),
                                      dimension_numbers=_DN)


def _num_chunks(n: int) -> int:
  # Split the B*H*W contraction into up to 16 chunks of >= 1024 rows (see
  # _conv_weight_grad); small maps (deep levels) are one plain matmul.
  for p in (16, 8, 4, 2):
    if n % p == 0 and n // p >= 1024:
      return p
  return 1


def _sum_leading(a: jax.Array) -> jax.Array:
  # An unrolled add chain is one elementwise loop fusion; XLA:CPU's reduce
  # over the leading axis (a YNNPACK fusion) took up to 0.3 s for a
  # (16, 1024, 1024) array.
  acc = a[0]
  for i in range(1, a.shape[0]):
    acc = acc + a[i]
  return acc


def _conv_weight_grad(x: jax.Array, g: jax.Array, k: int) -> jax.Array:
  """d(loss)/d(kernel) of a stride-1 'same' k x k conv, (k, k, Cin, Cout).

  XLA:CPU computes this as a convolution whose "kernel" is the whole output
  gradient, 5-10x the forward's time. Here: per kernel tap one shifted input
  slice contracted with the output gradient over B*H*W, split into chunks
  (a batched matmul, then a sum) because one matmul with a huge contraction
  and small Cin x Cout output parallelises badly. 1.5-3x faster than XLA's
  own on the U-Net's shapes; float32 results differ only in summation order
  (~1e-5 relative).
  """
  b, h, w, c = x.shape
  d = g.shape[-1]
  pad = k // 2
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

  def tap(u, v):
    # sum over rows of u^T v, as chunked batched matmuls plus an add chain.
    n = _num_chunks(u.shape[0] * u.shape[1] * u.shape[2])
    return _sum_leading(jnp.einsum(
        "pkc,pkd->pcd", u.reshape(n, -1, u.shape[-1]),
        v.reshape(n, -1, v.shape[-1]), preferred_element_type=jnp.float32))

  # Tap (i, j) pairs xp[:, i + y, j + x] with g[:, y, x]. Materialise the
  # shifted copies on the side with fewer channels: slices of the padded
  # input when Cin <= Cout, else the output gradient zero-padded into the
  # padded frame at offset (i, j) (the decoder's first convs have Cin = 2 Cout).
  if c <= d:
    taps = [tap(xp[:, i:i + h, j:j + w], g)
            for i in range(k) for j in range(k)]
  else:
    taps = [tap(xp, jnp.pad(g, ((0, 0), (i, 2 * pad - i), (j, 2 * pad - j),
                                (0, 0))))
            for i in range(k) for j in range(k)]
  return jnp.stack(taps).reshape(k, k, c, d)


# Per-layer 3x3 policy, measured per op with bench/conv3x3_micro.py and the
# full step with bench/unet.py (batch 4, 256 px, base 64; bench/README.md).
# XLA:CPU's direct convolution is fast while the maps are large and the
# channels few (memory-bound; Winograd's transforms would add 2-4x the traffic)
# and slow on the deep layers, where Winograd's batched GEMMs win: forward and
# input gradient by Winograd when min(Cin, Cout) >= WINOGRAD_MIN_CHANNELS, the
# weight gradient by Winograd (V^T dM per transform point, no shifted copies)
# whenever Cin >= WINOGRAD_DW_MIN_CIN (the 3-channel input layer keeps taps).
WINOGRAD_MIN_CHANNELS = 256
WINOGRAD_DW_MIN_CIN = 16


def conv_plan(x_shape: tuple[int, ...], w_shape: tuple[int, ...],
              dtype: Any = jnp.float32) -> tuple[int | None, int | None]:
  """(forward / input-gradient Winograd tile m or None for XLA's direct conv,
  weight-gradient Winograd tile m or None for per-tap matmuls)."""
  k, _, cin, cout = w_shape
  # Winograd's transforms (coefficients up to 8 and 1/24) are only measured
  # to stay within the parity tolerances in float32; bf16 etc. stay direct.
  if k != 3 or jnp.dtype(dtype) != jnp.float32:
    return None, None
  # F(4x4, 3x3) moves less data per output; on maps below 32 px its larger
  # (36, Cin, Cout) kernel transform costs more than it saves.
  m = 4 if min(x_shape[1], x_shape[2]) >= 32 else 2
  fwd = m if min(cin, cout) >= WINOGRAD_MIN_CHANNELS else None
  dw = m if cin >= WINOGRAD_DW_MIN_CIN else None
  return fwd, dw


def _on_cpu() -> bool:
  return jax.default_backend() == "cpu"


@jax.custom_vjp
def conv_same(x: jax.Array, w: jax.Array) -> jax.Array:
  """Stride-1 'same' conv (odd k), NHWC x HWIO: XLA's or Winograd's per
  `conv_plan`, with a faster gradient."""
  return _conv_same_fwd(x, w)[0]


def _conv_same_fwd(x, w):
  m, _ = conv_plan(x.shape, w.shape, x.dtype)
  if m is None:
    return _conv_same(x, w), (x, w, None, None)
  v = winograd.input_transform(x, m)
  u = winograd.kernel_transform(w, m)
  y = winograd.output_transform(winograd.transformed_matmul(v, u), m,
                                x.shape[:3])
  # V and U are kept for the backward (it needs no x).
  return y, (None, w, v, u)


def _conv_same_bwd(res, g):
  x, w, v, u = res
  if v is not None:
    # Winograd forward: the whole backward in the transform domain, sharing
    # dM = A dY A^T between dX = B (dM U^T) B^T and dU = V^T dM.
    m, _ = conv_plan(g.shape[:3] + (w.shape[2],), w.shape, v.dtype)
    dm = winograd.output_transform_transpose(g, m)
    dv = jnp.einsum("pnd,pcd->pnc", dm, u,
                    preferred_element_type=jnp.float32).astype(g.dtype)
    dx = winograd.input_transform_transpose(dv, m,
                                            g.shape[:3] + (w.shape[2],))
    du = jnp.einsum("pnc,pnd->pcd", v, dm, preferred_element_type=jnp.float32)
    return dx, winograd.kernel_transform_transpose(du, m).astype(w.dtype)
  # The input gradient is a plain convolution that XLA:CPU runs at forward
  # speed on these (shallow) layers.
  dx = jax.vjp(lambda x_: _conv_same(x_, w), x)[1](g)[0]
  _, mw = conv_plan(x.shape, w.shape, x.dtype)
  if mw is None:
    dw = _conv_weight_grad(x, g, w.shape[0])
  else:
    dw = winograd.weight_grad(winograd.input_transform(x, mw), g, mw)
  return dx, dw.astype(w.dtype)


conv_same.defvjp(_conv_same_fwd, _conv_same_bwd)


class Conv(nnx.Module):
  """k x k stride-1 conv, padding k // 2, bias: nnx.Conv's parameters
  (`kernel` (k, k, in, out), `bias`) with `conv_same`'s faster gradient."""

  def __init__(self, cin: int, cout: int, k: int, dtype: Any, *,
               rngs: nnx.Rngs):
    if k % 2 != 1:
      raise ValueError(f"kernel size must be odd, got {k}")
    self.dtype = dtype
    self.kernel = nnx.Param(_torch_kernel_init(rngs.params(), (k, k, cin, cout),
                                               jnp.float32))
    self.bias = nnx.Param(_torch_bias_init(cin * k * k)(rngs.params(), (cout,),
                                                        jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    x, w = x.astype(self.dtype), self.kernel[...].astype(self.dtype)
    if w.shape[0] == 1:
      # 1x1 (outconv): a plain matmul over channels. As a convolution,
      # XLA:CPU took 42 ms for 64 -> 3 channels at 256 px, batch 4.
      y = jnp.einsum("bhwc,cd->bhwd", x, w[0, 0])
    elif _on_cpu():
      # The custom gradient and Winograd plans are tuned for XLA:CPU;
      # GPU/TPU backends (cuDNN, the TPU's conv units) are fastest on plain
      # convs.
      y = conv_same(x, w)
    else:
      y = _conv_same(x, w)
    return y + self.bias[...].astype(self.dtype)


def _conv(cin: int, cout: int, k: int, dtype: Any, rngs: nnx.Rngs) -> Conv:
  return Conv(cin, cout, k, dtype, rngs=rngs)


class UpConv2x2(nnx.Module):
  """2x2 stride-2 transposed conv (bias) as one matmul plus depth-to-space.

  Same parameters as `nnx.ConvTranspose(cin, cout, (2, 2), strides=(2, 2),
  padding="VALID")`: `kernel` (kh, kw, in, out), not flipped
  (transpose_kernel=False), so a torch weight (in, out, kh, kw) maps here
  spatially flipped (see port/vuad). With stride == kernel size the output
  pixel (2h+i, 2w+j) only sees input pixel (h, w) through kernel tap
  (1-i, 1-j), so the layer is a (B*H*W, in) x (in, 4*out) matmul. XLA:CPU runs
  the lhs-dilated convolution of nnx.ConvTranspose through a slow generic path
  (its gradient took 32 s at 128->256 px, batch 4, base 64; this form 0.24 s).
  """

  def __init__(self, cin: int, cout: int, dtype: Any, *, rngs: nnx.Rngs):
    self.cin, self.cout, self.dtype = cin, cout, dtype
    self.kernel = nnx.Param(_torch_tkernel_init(rngs.params(),
                                                (2, 2, cin, cout), jnp.float32))
    self.bias = nnx.Param(_torch_bias_init(cout * 4)(rngs.params(), (cout,),
                                                     jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, _ = x.shape
    k = self.kernel[...][::-1, ::-1].astype(self.dtype)
    # One row-major (B*H*W, in) x (in, 2*2*out) matmul, then depth-to-space.
    # The einsum "bhwc,ijcd->bhiwjd" lowered to a dot with both operands
    # and its output transposed (~80 ms of copies per forward at base 64,
    # 256 px, batch 4).
    k2 = k.transpose(2, 0, 1, 3).reshape(self.cin, 4 * self.cout)
    y = jnp.dot(x.astype(self.dtype).reshape(b * h * w, self.cin), k2)
    y = y.reshape(b, h, w, 2, 2, self.cout).transpose(0, 1, 3, 2, 4, 5)
    y = y.reshape(b, 2 * h, 2 * w, self.cout)
    return y + self.bias[...].astype(self.dtype)


def _upconv(cin: int, cout: int, dtype: Any, rngs: nnx.Rngs) -> UpConv2x2:
  return UpConv2x2(cin, cout, dtype, rngs=rngs)


class ConvBlock(nnx.Module):
  """conv3x3 -> ReLU -> conv3x3 -> ReLU."""

  def __init__(self, cin: int, cout: int, dtype: Any, *, rngs: nnx.Rngs):
    self.conv1 = _conv(cin, cout, 3, dtype, rngs)
    self.conv2 = _conv(cout, cout, 3, dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.nn.relu(self.conv2(jax.nn.relu(self.conv1(x))))


@jax.custom_vjp
def _pool(x: jax.Array) -> jax.Array:
  # 2x2 stride-2 max pool as reshape + max: XLA:CPU runs this faster than
  # reduce_window, and the custom gradient below faster than both
  # select_and_scatter (0.45 s at 256 px, batch 4, 64 channels) and the
  # reshape-max's own gradient (which counts ties with slow reductions).
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _pool_fwd(x):
  y = _pool(x)
  return y, (x, y)


def _pool_bwd(res, g):
  # The whole gradient goes to the first maximum of each window in row-major
  # order, as in torch's max_pool2d and XLA's select_and_scatter.
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


def pool(x: jax.Array) -> jax.Array:
  """2x2 max-pool, stored before the next conv reads it: XLA:CPU fused the
  pool into that convolution's input, which made it 3-4x slower (64 -> 128
  channels at 128 px, batch 4: 176 ms against 46 ms for the conv alone)."""
  return xla_cpu.materialize(_pool(x))


class UNet(nnx.Module):
  """Reference U-Net; `residual=True` gives `unet_res` (x + f(x)).

  Args:
    in_channels, out_channels: input / output channels (NHWC last axis).
    base_channels: width of the first level (reference: 64).
    residual: return x + f(x) (needs in_channels == out_channels).
    dtype: compute dtype; parameters stay float32.
  """
  ARCH = "unet"  # name in efiqa_jax.checkpoints

  def __init__(self, in_channels: int = 3, out_channels: int = 3,
               base_channels: int = 64, residual: bool = True,
               dtype: Any = jnp.float32, *, rngs: nnx.Rngs):
    if residual and in_channels != out_channels:
      raise ValueError("residual U-Net needs in_channels == out_channels, got "
                       f"{in_channels} -> {out_channels}")
    if base_channels < 1:
      raise ValueError(f"base_channels must be >= 1, got {base_channels}")
    self.in_channels = in_channels
    self.out_channels = out_channels
    self.base_channels = base_channels
    self.residual = residual
    self.dtype = dtype
    b = base_channels
    self.conv1 = ConvBlock(in_channels, b, dtype, rngs=rngs)
    self.conv2 = ConvBlock(b, 2 * b, dtype, rngs=rngs)
    self.conv3 = ConvBlock(2 * b, 4 * b, dtype, rngs=rngs)
    self.conv4 = ConvBlock(4 * b, 8 * b, dtype, rngs=rngs)
    self.conv5 = ConvBlock(8 * b, 16 * b, dtype, rngs=rngs)
    self.upconv1 = _upconv(16 * b, 8 * b, dtype, rngs)
    self.conv6 = ConvBlock(16 * b, 8 * b, dtype, rngs=rngs)
    self.upconv2 = _upconv(8 * b, 4 * b, dtype, rngs)
    self.conv7 = ConvBlock(8 * b, 4 * b, dtype, rngs=rngs)
    self.upconv3 = _upconv(4 * b, 2 * b, dtype, rngs)
    self.conv8 = ConvBlock(4 * b, 2 * b, dtype, rngs=rngs)
    self.upconv4 = _upconv(2 * b, b, dtype, rngs)
    self.conv9 = ConvBlock(2 * b, b, dtype, rngs=rngs)
    self.outconv = _conv(b, out_channels, 1, dtype, rngs)

  def config(self) -> dict:
    """Constructor kwargs (JSON-able) that rebuild this module."""
    return dict(in_channels=self.in_channels, out_channels=self.out_channels,
                base_channels=self.base_channels, residual=self.residual,
                dtype=jnp.dtype(self.dtype).name)

  def _check(self, x: jax.Array):
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f"expected (B, H, W, {self.in_channels}) input, got "
                       f"{x.shape}")
    m = 2 ** NUM_POOLS
    if x.shape[1] % m or x.shape[2] % m:
      raise ValueError(f"H and W must be multiples of {m}, got {x.shape[1:3]}")

  def body(self, x: jax.Array) -> jax.Array:
    """f(x): the plain U-Net output (the residual for `unet_res`)."""
    self._check(x)
    x = x.astype(self.dtype)
    x1 = self.conv1(x)
    x2 = self.conv2(pool(x1))
    x3 = self.conv3(pool(x2))
    x4 = self.conv4(pool(x3))
    y = self.conv5(pool(x4))
    y = self.conv6(jnp.concatenate([x4, self.upconv1(y)], axis=-1))
    y = self.conv7(jnp.concatenate([x3, self.upconv2(y)], axis=-1))
    y = self.conv8(jnp.concatenate([x2, self.upconv3(y)], axis=-1))
    y = self.conv9(jnp.concatenate([x1, self.upconv4(y)], axis=-1))
    return self.outconv(y)

  def __call__(self, x: jax.Array) -> jax.Array:
    f = self.body(x)
    if not self.residual:
      return f
    # The skip stays in the input's precision (float32 input + bf16 residual
    # gives a float32 result).
    return x + f.astype(jnp.result_type(x.dtype, f.dtype))

  def anomaly(self, x: jax.Array) -> jax.Array:
    """|f(x)| averaged over channels, (B, H, W): VUAD's `diff_map`."""
    return jnp.mean(jnp.abs(self.body(x).astype(jnp.float32)), axis=-1)


def num_params(module: nnx.Module) -> int:
  return sum(int(p.size) for p in jax.tree.leaves(nnx.state(module, nnx.Param)))
