"""Transformer ops: dot-product attention and dense (linear) layers."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from efiqa_jax.kernels import switch

_LOW = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def dot_product_attention_plain(q: jax.Array, k: jax.Array, v: jax.Array,
                                scale: float) -> jax.Array:
  """softmax(q k^T * scale) v, logits and softmax in float32."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k,
                      preferred_element_type=jnp.float32) * scale
  p = jax.nn.softmax(logits, axis=-1)
  o = jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v,
                 preferred_element_type=jnp.float32)
  return o.astype(v.dtype)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          scale: float) -> jax.Array:
  """Multi-head attention without mask: q, k, v (B, N, heads, D) ->
  (B, N, heads, D) in v's dtype; logits and softmax in float32.

  Fast forms: cuDNN's fused (flash) attention for 16-bit inputs on a GPU
  that `cudnn_supported` says takes them (never materialises the (n, n)
  logits; a failure there raises); elsewhere the softmax divided after the
  value product, as flash attention does (the division touches (n, D)
  values, not (n, n)), with heads made leading for XLA:CPU float32, whose
  fused einsum call runs the (n, n) products slower than plain batched
  matmuls (bench/README.md). Plain form: `dot_product_attention_plain`.
  """
  if not switch.enabled():
    return dot_product_attention_plain(q, k, v, scale)
  if cudnn_supported(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, scale=scale,
                                        implementation="cudnn")
  if switch.on_cpu() and jnp.dtype(v.dtype).itemsize == 4:
    qh, kh, vh = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
    e, s = _softmax_parts(jnp.matmul(qh, kh.swapaxes(-1, -2),
                                     preferred_element_type=jnp.float32)
                          * scale)
    return (jnp.matmul(e, vh) / s).transpose(0, 2, 1, 3).astype(v.dtype)
  e, s = _softmax_parts(jnp.einsum("bqhd,bkhd->bhqk", q, k,
                                   preferred_element_type=jnp.float32)
                        * scale)
  o = jnp.einsum("bhqk,bkhd->bhqd", e.astype(v.dtype), v,
                 preferred_element_type=jnp.float32)
  return (o / s).transpose(0, 2, 1, 3).astype(v.dtype)


def _softmax_parts(logits):
  """(exp(l - max l), its row sums): softmax before its division."""
  m = jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True))
  e = jnp.exp(logits - m)
  return e, e.sum(axis=-1, keepdims=True)


def cudnn_supported(q: jax.Array, k: jax.Array, v: jax.Array) -> bool:
  """Whether cuDNN's fused attention takes these inputs, decided up front so
  that a failing cuDNN call is an error, not a silent fallback: a CUDA GPU of
  compute capability >= 8.0, fp16 / bf16 q, k, v of one dtype, head dim a
  multiple of 8 and <= 128 (256 from compute capability 9.0), as
  jax.nn.dot_product_attention(implementation="cudnn") requires."""
  if switch.backend() != "gpu":
    return False
  if not (q.dtype == k.dtype == v.dtype and jnp.dtype(q.dtype) in _LOW):
    return False
  cap = gpu_compute_capability()
  if cap is None or cap < (8, 0):
    return False
  d = q.shape[-1]
  return d % 8 == 0 and d <= (256 if cap >= (9, 0) else 128)


def gpu_compute_capability() -> tuple[int, ...] | None:
  """The first device's CUDA compute capability, None if it is not CUDA."""
  dev = jax.devices()[0]
  cap = getattr(dev, "compute_capability", None)
  version = str(getattr(getattr(dev, "client", None), "platform_version", ""))
  if cap is None or "cuda" not in version.lower():
    return None
  return tuple(int(p) for p in str(cap).split("."))


def dense(x: jax.Array, w: jax.Array, b: jax.Array | None = None, *,
          dtype=None, activation: Callable | None = None,
          w_layout: str = "in_out") -> jax.Array:
  """activation(x @ w + b) in compute `dtype` (default: x's and w's type).

  w is (in, out) (nnx.Linear's layout), or (out, in) with w_layout="out_in"
  (torch's; the ViT inference form).
  Fast form for fp16 / bf16: products accumulated in float32, the bias as
  stored (float32) and the activation applied to the float32 sum, one
  rounding at the end (XLA:CPU runs bf16 x bf16 -> float32 on its AMX path
  and bf16 -> bf16 slowly; GPUs and TPUs accumulate in float32 either way).
  Plain form: the product in `dtype`, then the bias rounded to `dtype` (as
  nnx.Linear and torch hold it), then the activation.
  """
  if w_layout not in ("in_out", "out_in"):
    raise ValueError(f"w_layout must be in_out or out_in, got {w_layout!r}")
  dtype = jnp.dtype(jnp.result_type(x, w) if dtype is None else dtype)
  x, w = x.astype(dtype), w.astype(dtype)
  dims = (((x.ndim - 1,), (0 if w_layout == "in_out" else 1,)), ((), ()))
  if switch.enabled() and dtype in _LOW:
    y = jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32)
    if b is not None:
      y = y + b.astype(jnp.float32)
    if activation is not None:
      y = activation(y)
    return y.astype(dtype)
  y = jax.lax.dot_general(x, w, dims)
  if b is not None:
    y = y + b.astype(dtype)
  return y if activation is None else activation(y)
