"""Per-layer 3x3 conv micro benchmark on the U-Net's shapes: XLA's direct
convolution vs Winograd F(2x2,3x3) / F(4x4,3x3) (efiqa_jax.kernels.winograd),
for the forward, the input gradient and the weight gradient.

  PYTHONPATH=$PWD python bench/conv3x3_micro.py [--batch 4 --size 256 --base 64]

Prints one JSON line per (layer shape, pass) with the median seconds of each
method; used to pick the per-layer plan in efiqa_jax.kernels.conv.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from efiqa_jax.kernels import conv, winograd


def _t(fn, *args, iters=5):
  jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t0)
  return sorted(ts)[len(ts) // 2]


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--size", type=int, default=256)
  ap.add_argument("--base", type=int, default=64)
  ap.add_argument("--iters", type=int, default=5)
  ap.add_argument("--only", default="fwd,dx,dw")
  args = ap.parse_args()
  b, s, c0 = args.batch, args.size, args.base
  shapes = [(s, 3, c0)]
  for lvl in range(5):
    c = c0 * 2 ** lvl
    if lvl:
      shapes.append((s >> lvl, c // 2, c))
    shapes.append((s >> lvl, c, c))
  for lvl in range(3, -1, -1):
    c = c0 * 2 ** lvl
    shapes.append((s >> lvl, 2 * c, c))
  rng = np.random.RandomState(0)
  direct = jax.jit(conv.conv2d_same_plain)
  for (r, ci, co) in shapes:
    x = jnp.asarray(rng.randn(b, r, r, ci).astype(np.float32))
    k = jnp.asarray(rng.randn(3, 3, ci, co).astype(np.float32) * 0.05)
    g = jnp.asarray(rng.randn(b, r, r, co).astype(np.float32))
    flops = 2 * b * r * r * 9 * ci * co
    row = dict(size=r, cin=ci, cout=co, gflop=flops / 1e9)
    if "fwd" in args.only:
      row["fwd_direct"] = _t(direct, x, k, iters=args.iters)
      for m in winograd.TILES:
        row[f"fwd_f{m}"] = _t(jax.jit(lambda x, k, m=m: winograd.conv3x3(x, k, m)),
                              x, k, iters=args.iters)
    if "dx" in args.only:
      dxd = jax.jit(lambda g, k: jax.vjp(lambda x_: conv.conv2d_same_plain(x_, k), x)[1](g)[0])
      row["dx_direct"] = _t(dxd, g, k, iters=args.iters)
      for m in winograd.TILES:
        f = jax.jit(lambda g, k, m=m: winograd.conv3x3(
            g, jnp.swapaxes(k[::-1, ::-1], 2, 3), m))
        row[f"dx_f{m}"] = _t(f, g, k, iters=args.iters)
    if "dw" in args.only:
      row["dw_taps"] = _t(jax.jit(lambda x, g: conv.conv_weight_grad_taps(x, g, 3)),
                          x, g, iters=args.iters)
      for m in winograd.TILES:
        v = jax.jit(lambda x, m=m: winograd.input_transform(x, m))(x)
        row[f"dw_f{m}"] = _t(jax.jit(lambda v, g, m=m: winograd.weight_grad(v, g, m)),
                             v, g, iters=args.iters)
        del v
    print(json.dumps({k_: (round(v_, 4) if isinstance(v_, float) else v_)
                      for k_, v_ in row.items()}), flush=True)


if __name__ == "__main__":
  main()
