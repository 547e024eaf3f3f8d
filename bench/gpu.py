"""Accelerator throughput of the two heavy networks, ours (JAX) vs PyTorch on
the same GPU with the same weights.

  PYTHONPATH=$PWD python bench/gpu.py [--only unet|vit] [--quick]

Prints one JSON line per measurement (images/s; `ratio` = ours / reference,
> 1 means efiqa_jax is faster):
  unet_forward_{fp32,bf16}     teacher U-Net (base 64, 256 px), batch 32
  unet_train_step_{fp32,bf16}  MSE + AdamW step, batch 16 (the paper's)
  vit_l16_{fp32,bf16}_224      DINOv3 ViT-L/16 forward, 224 px (EFIQA), batch 128
  vit_l16_bf16_1024            the same at 1024 px (EFIQA-CP's 64x64 tokens), batch 8

The reference is tuned the way a PyTorch user would run it on a GPU: cuDNN
autotuning on, channels-last convolutions, `torch.autocast` for bf16 (fp32
weights, as ours), SDPA attention in transformers. fp32 on both sides uses the
frameworks' default TF32 tensor-core math for convolutions (JAX's default
precision does the same for matmuls; torch keeps fp32 matmuls, so the fp32 ViT
line favours us). Medians of `--iters` timed calls after `--warmup` calls.
Runs on CPU too (small shapes with --quick), which is how it is tested.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time


def _median_time(fn, sync, warmup, iters):
  for _ in range(warmup):
    fn()
  sync()
  ts = []
  for _ in range(iters):
    t0 = time.perf_counter()
    fn()
    sync()
    ts.append(time.perf_counter() - t0)
  ts.sort()
  return ts[len(ts) // 2]


def _emit(name, n_img, t_ours, t_ref, extra):
  row = dict(name=name, ours=round(n_img / t_ours, 2),
             reference=round(n_img / t_ref, 2), unit="img/s",
             ratio=round(t_ref / t_ours, 3), **extra)
  print(json.dumps(row), flush=True)


def bench_unet(args, tdev, extra):
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  import torch
  from flax import nnx

  from efiqa_jax.models.unet import UNet
  from efiqa_jax.port.vuad import port_unet_state_dict
  from efiqa_jax.reference.unet import RefUNetRes

  torch.backends.cudnn.benchmark = True
  torch.manual_seed(0)
  ref = RefUNetRes(3, 3, args.unet_base)
  sd = {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}
  ref = ref.to(tdev).to(memory_format=torch.channels_last)
  sync_t = (torch.cuda.synchronize if tdev == "cuda" else (lambda: None))
  rng = np.random.RandomState(0)

  for dtype, tdtype in (("fp32", None), ("bf16", torch.bfloat16)):
    model = nnx.eval_shape(lambda: UNet(
        3, 3, args.unet_base,
        dtype=jnp.bfloat16 if tdtype else jnp.float32, rngs=nnx.Rngs(0)))
    # Fresh arrays per dtype: the train step below donates its inputs.
    nnx.update(model, nnx.state(port_unet_state_dict(sd), nnx.Param))
    graphdef, state = nnx.split(model)
    auto = (torch.autocast(tdev, dtype=tdtype) if tdtype else
            torch.autocast(tdev, enabled=False))

    # forward
    b, s = args.unet_batch, args.unet_size
    x_np = rng.rand(b, s, s, 3).astype(np.float32)
    x = jnp.asarray(x_np)
    xt = torch.from_numpy(x_np).permute(0, 3, 1, 2).to(tdev).contiguous(
        memory_format=torch.channels_last)
    fwd = jax.jit(lambda st, v: nnx.merge(graphdef, st)(v))
    ref.eval()

    def ref_fwd():
      with torch.no_grad(), auto:
        ref(xt)

    t_o = _median_time(lambda: fwd(state, x).block_until_ready(), lambda: None,
                       args.warmup, args.iters)
    t_r = _median_time(ref_fwd, sync_t, args.warmup, args.iters)
    with torch.no_grad(), auto:
      r = ref(xt).float().permute(0, 2, 3, 1).cpu().numpy()
    diff = float(np.abs(np.asarray(fwd(state, x), np.float32) - r).max())
    _emit(f"unet_forward_{dtype}", b, t_o, t_r,
          dict(extra, batch=b, size=s, base=args.unet_base,
               max_abs_diff_vs_reference=diff))

    # train step (the paper's batch 16)
    b = args.unet_train_batch
    x_np = rng.rand(b, s, s, 3).astype(np.float32)
    x, y = jnp.asarray(x_np), jnp.asarray(x_np[::-1].copy())
    xt = torch.from_numpy(x_np).permute(0, 3, 1, 2).to(tdev).contiguous(
        memory_format=torch.channels_last)
    yt = xt.flip(0)
    tx = optax.adamw(1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)
    carry = [state, tx.init(state)]

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(st, opt, x, y):
      def loss_fn(p):
        out = nnx.merge(graphdef, p)(x).astype(jnp.float32)
        return jnp.mean((out - y) ** 2)
      loss, g = jax.value_and_grad(loss_fn)(st)
      upd, opt = tx.update(g, opt, st)
      return optax.apply_updates(st, upd), opt, loss

    def ours_step():
      st, opt, loss = step(carry[0], carry[1], x, y)
      loss.block_until_ready()
      carry[0], carry[1] = st, opt

    ref.train()
    topt = torch.optim.AdamW(ref.parameters(), lr=1e-3)

    def ref_step():
      topt.zero_grad(set_to_none=True)
      with auto:
        loss = torch.nn.functional.mse_loss(ref(xt).float(), yt)
      loss.backward()
      topt.step()

    t_o = _median_time(ours_step, lambda: None, args.warmup, args.iters)
    t_r = _median_time(ref_step, sync_t, args.warmup, args.iters)
    _emit(f"unet_train_step_{dtype}", b, t_o, t_r,
          dict(extra, batch=b, size=s, base=args.unet_base))
    carry.clear()  # the trained state's buffers go before the next dtype


def bench_vit(args, tdev, extra):
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  import transformers

  from efiqa_jax.kernels import vit_inference
  from efiqa_jax.port import vit as port_vit

  if args.quick:
    kw = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=128)
  else:  # DINOv3 ViT-L/16
    kw = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
              intermediate_size=4096)
  cfg = transformers.DINOv3ViTConfig(
      num_register_tokens=4, patch_size=16, layer_norm_eps=1e-5,
      rope_theta=100.0, **kw)
  torch.manual_seed(0)
  ref = transformers.DINOv3ViTModel(cfg).eval()
  with tempfile.TemporaryDirectory() as tmp:
    ref.save_pretrained(tmp)
    ours32, _ = port_vit.convert("dinov3", tmp)
  ref = ref.to(tdev)
  sync_t = (torch.cuda.synchronize if tdev == "cuda" else (lambda: None))
  fwd = jax.jit(lambda m, v: m(v))
  for name, dtype, size, batch in (
      ("vit_l16_fp32_224", "fp32", args.vit_size, args.vit_batch),
      ("vit_l16_bf16_224", "bf16", args.vit_size, args.vit_batch),
      ("vit_l16_bf16_1024", "bf16", args.vit_big_size, args.vit_big_batch)):
    # As `efiqa extract/assess` run a frozen encoder.
    if dtype == "bf16":
      model = vit_inference.inference_model(ours32, jnp.bfloat16)
      auto = torch.autocast(tdev, dtype=torch.bfloat16)
    else:
      model = vit_inference.inference_model(ours32)
      auto = torch.autocast(tdev, enabled=False)
    x_np = np.random.default_rng(0).normal(
        size=(batch, size, size, 3)).astype(np.float32)
    xj = jnp.asarray(x_np)
    xt = torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy()).to(tdev)

    def ref_fwd():
      with torch.no_grad(), auto:
        ref(pixel_values=xt).last_hidden_state

    t_o = _median_time(lambda: fwd(model, xj).block_until_ready(),
                       lambda: None, args.warmup, args.iters)
    t_r = _median_time(ref_fwd, sync_t, args.warmup, args.iters)
    with torch.no_grad(), auto:
      r = ref(pixel_values=xt).last_hidden_state.float().cpu().numpy()
    diff = float(np.abs(np.asarray(fwd(model, xj), np.float32) - r).max())
    _emit(name, batch, t_o, t_r, dict(extra, batch=batch, size=size,
                                      max_abs_diff_vs_reference=diff))


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--only", choices=("unet", "vit"))
  ap.add_argument("--quick", action="store_true",
                  help="tiny shapes (a CPU smoke run)")
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--iters", type=int, default=10)
  ap.add_argument("--unet-batch", type=int, default=32)
  ap.add_argument("--unet-train-batch", type=int, default=16)
  ap.add_argument("--unet-size", type=int, default=256)
  ap.add_argument("--unet-base", type=int, default=64)
  ap.add_argument("--vit-batch", type=int, default=128)
  ap.add_argument("--vit-size", type=int, default=224)
  ap.add_argument("--vit-big-batch", type=int, default=8)
  ap.add_argument("--vit-big-size", type=int, default=1024)
  args = ap.parse_args(argv)
  if args.quick:
    args.warmup, args.iters = 1, 2
    args.unet_batch, args.unet_train_batch, args.unet_size = 2, 2, 32
    args.unet_base = 4
    args.vit_batch, args.vit_size, args.vit_big_batch = 2, 32, 1
    args.vit_big_size = 64

  import jax
  import torch
  tdev = "cuda" if torch.cuda.is_available() else "cpu"
  dev = jax.devices()[0]
  extra = dict(device=getattr(dev, "device_kind", str(dev)),
               torch_device=(torch.cuda.get_device_name(0) if tdev == "cuda"
                             else "cpu"),
               jax=jax.__version__, torch=torch.__version__)
  print(json.dumps({"info": extra}), file=sys.stderr, flush=True)
  if args.only in (None, "unet"):
    bench_unet(args, tdev, extra)
  if args.only in (None, "vit"):
    bench_vit(args, tdev, extra)
  return 0


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
      __file__))))
  sys.exit(main())
