"""U-Net speed: efiqa_jax (Flax NNX, jitted) vs the torch reference (eager).

Same CPU, same weights (the torch model's random weights ported with
efiqa_jax.port.vuad), same inputs. Prints two JSON lines on stdout:

  {"name": "unet_forward", "ours": img/s, "reference": img/s, "unit": "img/s",
   "ratio": ours / reference}
  {"name": "unet_train_step", "ours": s/step, "reference": s/step,
   "unit": "s/step", "ratio": reference / ours}

ratio > 1 means efiqa_jax is faster. Details (threads, settings) go to stderr.
Run from the repository root:

  PYTHONPATH=$PWD python bench/unet.py            # batch 4, 256x256, base 64
  PYTHONPATH=$PWD python bench/unet.py --quick    # smoke run, seconds
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time


def _timeit(fn, warmup: int, iters: int) -> float:
  """Median seconds per call after `warmup` untimed calls."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  times.sort()
  return times[len(times) // 2]


def _timeit_pair(fa, fb, warmup: int, iters: int) -> tuple[float, float]:
  """Medians of `fa` and `fb` timed alternately (a, b, a, b, ...), so that
  both see the same background load on a shared machine."""
  for _ in range(warmup):
    fa()
    fb()
  ta, tb = [], []
  for _ in range(iters):
    for f, ts in ((fa, ta), (fb, tb)):
      t0 = time.perf_counter()
      f()
      ts.append(time.perf_counter() - t0)
  ta.sort()
  tb.sort()
  return ta[len(ta) // 2], tb[len(tb) // 2]


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--size", type=int, default=256)
  ap.add_argument("--base", type=int, default=64)
  ap.add_argument("--warmup", type=int, default=1)
  ap.add_argument("--iters", type=int, default=3)
  ap.add_argument("--alternate", action="store_true",
                  help="time ours and the reference call by call in turn "
                  "(fairer on a machine shared with other jobs)")
  ap.add_argument("--quick", action="store_true",
                  help="batch 2, 64x64, base 16, 1 warm-up, 3 iterations")
  args = ap.parse_args(argv)
  if args.quick:
    args.batch, args.size, args.base, args.warmup, args.iters = 2, 64, 16, 1, 3

  import numpy as np
  import torch
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  from efiqa_jax.port.vuad import port_unet_state_dict
  from efiqa_jax.reference.unet import RefUNetRes

  torch.manual_seed(0)
  ref = RefUNetRes(3, 3, args.base)
  sd = {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}
  model = port_unet_state_dict(sd)
  graphdef, state = nnx.split(model)

  rng = np.random.RandomState(0)
  shape = (args.batch, args.size, args.size, 3)
  x_np = rng.rand(*shape).astype(np.float32)
  y_np = rng.rand(*shape).astype(np.float32)
  x, y = jnp.asarray(x_np), jnp.asarray(y_np)
  xt = torch.from_numpy(x_np).permute(0, 3, 1, 2).contiguous()
  yt = torch.from_numpy(y_np).permute(0, 3, 1, 2).contiguous()

  # --- forward
  @jax.jit
  def fwd(state, x):
    return nnx.merge(graphdef, state)(x)

  ref.eval()

  def ours_fwd():
    fwd(state, x).block_until_ready()

  def ref_fwd():
    with torch.no_grad():
      ref(xt)

  if args.alternate:
    ours_f, ref_f = _timeit_pair(ours_fwd, ref_fwd, args.warmup, args.iters)
  else:
    ours_f = _timeit(ours_fwd, args.warmup, args.iters)
    ref_f = _timeit(ref_fwd, args.warmup, args.iters)
  diff = float(np.abs(np.asarray(fwd(state, x)).transpose(0, 3, 1, 2) -
                      ref(xt).detach().numpy()).max())

  # --- train step: MSE + AdamW (torch defaults: lr 1e-3, wd 0.01)
  tx = optax.adamw(1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)
  opt_state = tx.init(state)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(state, opt_state, x, y):
    def loss_fn(s):
      return jnp.mean((nnx.merge(graphdef, s)(x) - y) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(state)
    updates, opt_state = tx.update(grads, opt_state, state)
    return optax.apply_updates(state, updates), opt_state, loss

  carry = [state, opt_state]

  def ours_step():
    s, o, loss = step(carry[0], carry[1], x, y)
    loss.block_until_ready()
    carry[0], carry[1] = s, o

  ref.train()
  topt = torch.optim.AdamW(ref.parameters(), lr=1e-3)

  def ref_step():
    topt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.mse_loss(ref(xt), yt)
    loss.backward()
    topt.step()

  if args.alternate:
    ours_t, ref_t = _timeit_pair(ours_step, ref_step, args.warmup, args.iters)
  else:
    ours_t = _timeit(ours_step, args.warmup, args.iters)
    ref_t = _timeit(ref_step, args.warmup, args.iters)

  info = dict(batch=args.batch, size=args.size, base=args.base,
              warmup=args.warmup, iters=args.iters, timing="median",
              alternate=args.alternate,
              forward_max_abs_diff=diff, jax=jax.__version__,
              torch=torch.__version__, torch_threads=torch.get_num_threads(),
              cpu_count=os.cpu_count(), jax_devices=str(jax.devices()))
  print(json.dumps({"info": info}), file=sys.stderr)
  n = args.batch
  print(json.dumps({"name": "unet_forward", "ours": n / ours_f,
                    "reference": n / ref_f, "unit": "img/s",
                    "ratio": (n / ours_f) / (n / ref_f)}))
  print(json.dumps({"name": "unet_train_step", "ours": ours_t,
                    "reference": ref_t, "unit": "s/step",
                    "ratio": ref_t / ours_t}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
