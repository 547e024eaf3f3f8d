"""Distillation losses on adapter logits z against teacher patch labels y.

Both take an optional `mask` (1 = counts); padded rows of a sharded batch
carry 0. Positive = degraded (pseudo-label 255 -> 1).

bce_pos_weight: torch BCEWithLogits(pos_weight=w), averaged over the mask:
  l = w * y * softplus(-z) + (1 - y) * softplus(z)
  (EFIQA: w = 20 in the paper, 9.58 in the public config).

nnpu (EFIQA-CP, `loss/nnpu.py`, efiqa-method.md §4.2): P = labelled bad
(y > 0.5), U = everything else, pooled over the whole batch:
  L = w * pi * mean_P softplus(-z) + max(beta, mean_U softplus(z)
                                           - pi * mean_P softplus(z))
(w = pos_weight, 1 in EFIQA-CP).
A batch without P or without U pixels is skipped by the reference; here its
loss is 0 (so its gradient is 0) and `valid` is 0 so metrics can skip it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def bce_pos_weight(logits, targets, pos_weight: float = 1.0, mask=None):
  z = logits.astype(jnp.float32)
  y = targets.astype(jnp.float32)
  m = jnp.ones_like(z) if mask is None else jnp.broadcast_to(
      mask.astype(jnp.float32), z.shape)
  per = pos_weight * y * jax.nn.softplus(-z) + (1.0 - y) * jax.nn.softplus(z)
  return jnp.sum(per * m) / jnp.maximum(jnp.sum(m), 1.0)


def nnpu(logits, targets, pi: float = 0.05, beta: float = 0.0, mask=None,
         pos_weight: float = 1.0):
  """(loss, valid) with valid in {0., 1.} (0 = batch lacks P or U)."""
  z = logits.astype(jnp.float32)
  m = jnp.ones_like(z) if mask is None else jnp.broadcast_to(
      mask.astype(jnp.float32), z.shape)
  p = (targets.astype(jnp.float32) > 0.5).astype(jnp.float32) * m
  u = (1.0 - (targets.astype(jnp.float32) > 0.5)) * m
  n_p, n_u = jnp.sum(p), jnp.sum(u)
  valid = (n_p > 0) & (n_u > 0)
  rp_plus = jnp.sum(p * jax.nn.softplus(-z)) / jnp.maximum(n_p, 1.0)
  rp_minus = jnp.sum(p * jax.nn.softplus(z)) / jnp.maximum(n_p, 1.0)
  ru_minus = jnp.sum(u * jax.nn.softplus(z)) / jnp.maximum(n_u, 1.0)
  loss = pos_weight * pi * rp_plus + jnp.maximum(beta,
                                                 ru_minus - pi * rp_minus)
  return jnp.where(valid, loss, 0.0), valid.astype(jnp.float32)


def distill_loss(name: str, logits, targets, mask=None, *,
                 pos_weight: float = 1.0, pi: float = 0.05, beta: float = 0.0):
  """(loss, valid) for the config's loss name ('bce' | 'nnpu')."""
  if name == "bce":
    return (bce_pos_weight(logits, targets, pos_weight, mask),
            jnp.float32(1.0))
  if name == "nnpu":
    return nnpu(logits, targets, pi, beta, mask, pos_weight)
  raise ValueError(f"unknown loss {name!r}; known: bce, nnpu")
