"""The ViT's inference form, for a frozen encoder that is only run.

`inference_params` is a pure function from a `VisionTransformer`'s checkpoint
tree to the inference tree: q, k and v fused into one d -> 3d projection (one
GEMM reads the tokens once, and one 1024 x 3072 GEMM runs faster than three
1024 x 1024 ones), every dense kernel held (out, in) as torch holds it
(XLA:CPU's bf16 GEMM runs x @ W^T faster than x @ W), and with a 16-bit
compute dtype every kernel stored in it (no cast inside each call).
`InferenceViT` runs that tree with the model's own code; `inference_model`
builds one from a model. The checkpoint tree (what checkpoints and sharding
rules name) is never changed; tests/test_kernels.py holds the two forms to
the same outputs.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from efiqa_jax.kernels import attention, switch
from efiqa_jax.models import vit


def _low(dtype) -> bool:
  return jnp.dtype(dtype).itemsize < 4


def frozen_params(params: dict, dtype: Any) -> dict:
  """`params` with every floating "kernel" leaf in `dtype` when that is a
  16-bit type (biases, norms and tables stay float32); else `params`."""
  if not _low(dtype):
    return params

  def cast(path, a):
    name = getattr(path[-1], "key", None)
    if name == "kernel" and jnp.issubdtype(a.dtype, jnp.floating):
      return jnp.asarray(a, dtype)
    return a

  return jax.tree_util.tree_map_with_path(cast, params)


def inference_params(params: dict, dtype: Any = jnp.float32) -> dict:
  """The inference tree of a ViT checkpoint tree (`nnx.to_pure_dict` of its
  parameters); `params` is not changed.

  blocks/i/attn/{q,k,v} -> blocks/i/attn/qkv (kernel (3d, d), bias (3d,), a
  missing bias as zeros: x + 0 is x); the kernels of attn/out and of the
  MLP / SwiGLU layers transposed to (out, in); kernels cast as by
  `frozen_params`.
  """
  params = frozen_params(params, dtype)
  blocks = {}
  for i, blk in params["blocks"].items():
    attn = {k: v for k, v in blk["attn"].items() if k not in ("q", "k", "v")}
    parts = [blk["attn"][n] for n in ("q", "k", "v")]
    d = parts[0]["kernel"].shape[1]
    attn["qkv"] = {
        "kernel": jnp.concatenate([p["kernel"] for p in parts], axis=1).T,
        "bias": jnp.concatenate([
            jnp.asarray(p["bias"], jnp.float32) if "bias" in p
            else jnp.zeros((d,), jnp.float32) for p in parts])}
    attn["out"] = _out_in(attn["out"])
    blocks[i] = dict(blk, attn=attn,
                     mlp={k: _out_in(v) for k, v in blk["mlp"].items()})
  return dict(params, blocks=blocks)


def _out_in(lin: dict) -> dict:
  return dict(lin, kernel=jnp.asarray(lin["kernel"]).T)


class OutInLinear(nnx.Module):
  """A dense layer holding its kernel (out, in); always has a bias."""

  def __init__(self, d_in: int, d_out: int, dtype: Any):
    self.dtype = dtype
    self.kernel = nnx.Param(jnp.zeros((d_out, d_in), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((d_out,), jnp.float32))

  def __call__(self, x, activation=None):
    return attention.dense(x, self.kernel[...], self.bias[...],
                           dtype=self.dtype, activation=activation,
                           w_layout="out_in")


class FusedAttention(vit.Attention):
  """`vit.Attention` with one fused q/k/v projection."""

  def __init__(self, d: int, heads: int, dtype: Any):
    self.heads = heads
    self.dtype = dtype
    self.qkv = OutInLinear(d, 3 * d, dtype)
    self.out = OutInLinear(d, d, dtype)

  def project(self, x):
    return jnp.split(self.qkv(x), 3, axis=-1)


class InferenceMlp(vit.Mlp):

  def __init__(self, d: int, hidden: int, dtype: Any):
    self.fc1 = OutInLinear(d, hidden, dtype)
    self.fc2 = OutInLinear(hidden, d, dtype)


class InferenceSwiGLU(vit.SwiGLU):

  def __init__(self, d: int, hidden: int, dtype: Any):
    self.gate = OutInLinear(d, hidden, dtype)
    self.up = OutInLinear(d, hidden, dtype)
    self.down = OutInLinear(hidden, d, dtype)


class InferenceBlock(vit.Block):
  """`vit.Block` with the inference form's attention and MLP (built only
  abstractly, under nnx.eval_shape, by `inference_model`)."""

  def __init__(self, cfg: dict, dtype: Any, *, rngs: nnx.Rngs):
    super().__init__(cfg, dtype, rngs=rngs)  # norms and layer scales
    d, hidden = cfg["hidden_size"], cfg["mlp_hidden"]
    self.attn = FusedAttention(d, cfg["num_heads"], dtype)
    ffn = InferenceMlp if cfg["ffn"] == "mlp" else InferenceSwiGLU
    self.mlp = ffn(d, hidden, dtype)


class InferenceViT(vit.VisionTransformer):
  """`vit.VisionTransformer` over `inference_params`' tree. Not a
  checkpoint: it has no ARCH, so `checkpoints.save_model` refuses it."""
  ARCH = None
  block_cls = InferenceBlock


def inference_model(model: vit.VisionTransformer, dtype: Any = None
                    ) -> vit.VisionTransformer:
  """A run-only copy of `model` in compute `dtype` (default: its own): an
  `InferenceViT` holding `inference_params` of its parameters, with the same
  outputs. With kernels off (when this is called) a plain
  `VisionTransformer` holding the checkpoint tree, kernels cast as by
  `frozen_params`. `model` is not changed."""
  dtype = jnp.dtype(model.dtype if dtype is None else dtype)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  if switch.enabled():
    cls, tree = InferenceViT, inference_params(params, dtype)
  else:
    cls, tree = vit.VisionTransformer, frozen_params(params, dtype)
  out = nnx.eval_shape(lambda: cls(**model.cfg, dtype=dtype,
                                   rngs=nnx.Rngs(0)))
  state = nnx.state(out, nnx.Param)
  nnx.replace_by_pure_dict(state, tree)
  nnx.update(out, state)
  return out
