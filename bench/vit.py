"""ViT-L/16 forward speed at 224x224: efiqa_jax vs transformers' DINOv3
(PyTorch), same CPU, same weights, float32 and bfloat16.

One JSON line per setting (name, ours, reference, unit, ratio, ...):
  vit_l16_fp32, vit_l16_bf16   ours/reference in ms per batch (medians of
  --iters timed calls after a warm-up / compile call, the two sides
  alternating call by call); ratio = the median of the per-pair
  reference / ours (> 1: ours is faster).

The weights are a randomly initialised HF DINOv3ViTModel with the
facebook/dinov3-vitl16 config, saved with save_pretrained and ported with
`efiqa_jax.port.vit.port` (the `efiqa port dinov3` path). Also reports the
float32 max |diff| of last_hidden_state between the two, as a sanity check.

  PYTHONPATH=$PWD python bench/vit.py --batch 2 --iters 3
"""
import argparse
import json
import os
import statistics
import tempfile
import time


def _time_pairs(run_ref, run_ours, iters):
  """(median ref ms, median ours ms, median of the per-pair ratios): after
  one warm-up call each, `iters` pairs timed back to back, the order
  alternating, so that both sides see the same load on a shared machine."""
  run_ref()
  run_ours()
  refs, ours = [], []
  for i in range(iters):
    pair = ((refs, run_ref), (ours, run_ours))
    for ts, fn in (pair if i % 2 == 0 else pair[::-1]):
      t0 = time.perf_counter()
      fn()
      ts.append((time.perf_counter() - t0) * 1e3)
  ratios = [r / o for r, o in zip(refs, ours)]
  return (statistics.median(refs), statistics.median(ours),
          statistics.median(ratios))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=2)
  ap.add_argument("--size", type=int, default=224)
  ap.add_argument("--iters", type=int, default=3)
  ap.add_argument("--threads", type=int, default=os.cpu_count())
  args = ap.parse_args()

  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  import transformers

  from efiqa_jax.kernels import vit_inference
  from efiqa_jax.port import vit as port_vit

  torch.set_num_threads(args.threads)
  cfg = transformers.DINOv3ViTConfig(
      hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
      intermediate_size=4096, num_register_tokens=4, patch_size=16,
      layer_norm_eps=1e-5, rope_theta=100.0)
  torch.manual_seed(0)
  ref = transformers.DINOv3ViTModel(cfg).eval()
  with tempfile.TemporaryDirectory() as tmp:
    ref.save_pretrained(tmp)
    ours32, _ = port_vit.convert("dinov3", tmp)
  # Both run as `efiqa extract/assess` run a frozen encoder: bf16 kernels
  # held in bf16 (as the reference holds its weights), q/k/v fused, kernels
  # (out, in) (`kernels.vit_inference`; the same outputs as the ported tree).
  ours_bf = vit_inference.inference_model(ours32, jnp.bfloat16)
  ours32 = vit_inference.inference_model(ours32)

  x = np.random.default_rng(0).normal(
      size=(args.batch, args.size, args.size, 3)).astype(np.float32)
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  xj = jnp.asarray(x)
  fwd = jax.jit(lambda m, v: m(v))

  with torch.no_grad():
    r32 = ref(pixel_values=xt).last_hidden_state.numpy()
  o32 = np.asarray(fwd(ours32, xj))
  diff = float(np.abs(o32 - r32).max())

  common = dict(batch=args.batch, size=args.size, iters=args.iters,
                threads=args.threads, cpus=os.cpu_count(),
                device=str(jax.devices()[0]), torch=torch.__version__,
                jax=jax.__version__)
  for name, model, tdtype in (("vit_l16_fp32", ours32, torch.float32),
                              ("vit_l16_bf16", ours_bf, torch.bfloat16)):
    ref_m = ref.to(tdtype)
    xin = xt.to(tdtype)

    def run_ref():
      with torch.no_grad():
        ref_m(pixel_values=xin).last_hidden_state.float().numpy()

    def run_ours():
      fwd(model, xj).block_until_ready()

    t_ref, t_ours, ratio = _time_pairs(run_ref, run_ours, args.iters)
    row = dict(name=name, ours=round(t_ours, 2), reference=round(t_ref, 2),
               unit="ms/batch", ratio=round(ratio, 3), **common)
    if name == "vit_l16_fp32":
      row["max_abs_diff_fp32"] = diff
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
