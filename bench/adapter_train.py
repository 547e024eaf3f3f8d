"""Adapter training step: efiqa-jax (jit, optax AdamW) vs PyTorch (eager,
torch.optim.AdamW) on the same CPU, same shapes, same loss.

  PYTHONPATH=$PWD python bench/adapter_train.py [--steps 30]

Cases: EFIQA's sc_linear on a batch of 4096 patches of D = 1024 with BCE
pos_weight 20; EFIQA-CP's ModernHead64to16 (reduced: D = 256, mid 128,
32 x 32 tokens, batch 4) with nnPU. Prints ms/step and the ratio
torch / jax (> 1 means efiqa-jax is faster)."""
import argparse
import time

import numpy as np


def _time(fn, steps):
  fn()  # warm-up / compile
  t = time.perf_counter()
  for _ in range(steps):
    fn()
  return (time.perf_counter() - t) / steps * 1e3


def jax_case(adapter, x, y, loss_name, steps):
  import jax
  import optax
  from flax import nnx
  from efiqa_jax.student import losses
  graphdef, params = nnx.split(adapter, nnx.Param)
  params = nnx.to_pure_dict(params)
  tx = optax.adamw(1e-3, weight_decay=0.01)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, x, y):
    def loss_fn(p):
      z = nnx.merge(graphdef, p)(x)
      return losses.distill_loss(loss_name, z, y, pos_weight=20.0)[0]
    loss, g = jax.value_and_grad(loss_fn)(params)
    u, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, u), opt, loss

  x, y = jax.numpy.asarray(x), jax.numpy.asarray(y)
  state = [params, opt]

  def run():
    state[0], state[1], loss = step(state[0], state[1], x, y)
    loss.block_until_ready()
  return _time(run, steps)


def torch_case(model, x, y, loss_fn, steps):
  import torch
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
  x, y = torch.from_numpy(x), torch.from_numpy(y)

  def run():
    opt.zero_grad()
    loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()
  return _time(run, steps)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=30)
  a = ap.parse_args()
  import torch
  from flax import nnx
  from efiqa_jax.models import adapters
  rng = np.random.default_rng(0)
  torch.set_num_threads(torch.get_num_threads())

  # sc_linear, 4096 x 1024 patches.
  x = rng.normal(size=(4096, 1024)).astype(np.float32)
  y = (rng.random(4096) < 0.1).astype(np.float32)
  tj = jax_case(adapters.LinearAdapter(1024, rngs=nnx.Rngs(0)), x, y, "bce",
                a.steps)
  lin = torch.nn.Linear(1024, 1)
  bce = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(20.0))
  tt = torch_case(lin, x, y, lambda z, t: bce(z[:, 0], t), a.steps)
  print(f"sc_linear 4096x1024: jax {tj:.2f} ms, torch {tt:.2f} ms, "
        f"torch/jax {tt / tj:.2f}")

  # Reduced ModernHead64to16 + nnPU.
  x = rng.normal(size=(4, 32, 32, 256)).astype(np.float32)
  y = (rng.random((4, 8, 8)) < 0.2).astype(np.float32)
  head = adapters.ModernHead64to16(256, mid_channels=128, drop_path=0.0,
                                   rngs=nnx.Rngs(0))
  tj = jax_case(head, x, y, "nnpu", max(3, a.steps // 5))
  from efiqa_jax.reference.adapters import SpaceAdmiralCNN  # pylint: disable=g-import-not-at-top
  ref = SpaceAdmiralCNN(256, 128, 1.0).model

  def nnpu(z, t, pi=0.05):
    z, t = z[:, 0].reshape(-1), t.reshape(-1) > 0.5
    sp = torch.nn.functional.softplus
    return pi * sp(-z[t]).mean() + torch.clamp(
        sp(z[~t]).mean() - pi * sp(z[t]).mean(), min=0.0)
  xt = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
  tt = torch_case(ref, xt, y, nnpu, max(3, a.steps // 5))
  print(f"ModernHead64to16 (D 256, mid 128, 32x32, batch 4): jax {tj:.1f} ms,"
        f" torch {tt:.1f} ms, torch/jax {tt / tj:.2f}")


if __name__ == "__main__":
  main()
