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

from efiqa_jax.kernels import conv
from efiqa_jax.kernels.pool import max_pool_2x2

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


class Conv(nnx.Module):
  """k x k stride-1 conv, padding k // 2, bias: nnx.Conv's parameters
  (`kernel` (k, k, in, out), `bias`)."""

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
    y = conv.conv2d_same(x.astype(self.dtype),
                         self.kernel[...].astype(self.dtype))
    return y + self.bias[...].astype(self.dtype)


def _conv(cin: int, cout: int, k: int, dtype: Any, rngs: nnx.Rngs) -> Conv:
  return Conv(cin, cout, k, dtype, rngs=rngs)


class UpConv2x2(nnx.Module):
  """2x2 stride-2 transposed conv (bias), torch's ConvTranspose2d(k=2, s=2).

  Same parameters as `nnx.ConvTranspose(cin, cout, (2, 2), strides=(2, 2),
  padding="VALID")`: `kernel` (kh, kw, in, out), not flipped
  (transpose_kernel=False), so a torch weight (in, out, kh, kw) maps here
  spatially flipped (see port/vuad).
  """

  def __init__(self, cin: int, cout: int, dtype: Any, *, rngs: nnx.Rngs):
    self.cin, self.cout, self.dtype = cin, cout, dtype
    self.kernel = nnx.Param(_torch_tkernel_init(rngs.params(),
                                                (2, 2, cin, cout), jnp.float32))
    self.bias = nnx.Param(_torch_bias_init(cout * 4)(rngs.params(), (cout,),
                                                     jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    y = conv.conv_transpose_2x2(x.astype(self.dtype),
                                self.kernel[...].astype(self.dtype))
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
    x2 = self.conv2(max_pool_2x2(x1))
    x3 = self.conv3(max_pool_2x2(x2))
    x4 = self.conv4(max_pool_2x2(x3))
    y = self.conv5(max_pool_2x2(x4))
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


def num_params(module: nnx.Module) -> int:
  return sum(int(p.size) for p in jax.tree.leaves(nnx.state(module, nnx.Param)))
