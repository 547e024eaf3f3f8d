"""Does a code change alter what XLA runs? Compiled programs, A/B by git rev.

  PYTHONPATH=$PWD python bench/same_program.py --before 8bb90ff [--after HEAD]

For each network of the speed harnesses (U-Net forward and MSE + AdamW
train step as bench/unet.py times them, base 64, batch 4, 256²; DINOv3 ViT-L/16 forward in its inference form, 224², batch 2, fp32
and bf16; random weights from the reference models) both trees are compiled
on this machine's backend in fresh processes, and the optimised HLO is
compared instruction by instruction (names, source locations and metadata
stripped). Identical programs run at the same speed whatever the machine's
load: a timing A/B cannot show that on a shared 2-core machine. Prints one
JSON line per network: identical, and the instruction counts of each side.
Needs the `port` extra (torch, transformers).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NETWORKS = ("unet_forward", "unet_train_step", "vit_l16_fp32", "vit_l16_bf16")


def _instructions(hlo: str) -> list[str]:
  keep = [l for l in hlo.splitlines()
          if re.match(r"^\s*(ROOT )?%[\w.\-]+ = |^ENTRY|^%|^}", l)]
  out = []
  for l in keep:
    l = re.sub(r", metadata=\{[^}]*\}", "", l)
    l = re.sub(r"%[\w.\-]+", "%v", l)
    out.append(re.sub(r", stack_frame_id=[0-9]+", "", l))
  return out


def _dump(out_dir: str) -> None:
  """In the tree on sys.path: write each network's instructions."""
  import tempfile as tf  # pylint: disable=g-import-not-at-top,reimported
  import jax
  import jax.numpy as jnp
  import optax
  import torch
  import transformers
  from flax import nnx

  from efiqa_jax.models import vit
  from efiqa_jax.port import vit as port_vit
  from efiqa_jax.port.vuad import port_unet_state_dict
  from efiqa_jax.reference.unet import RefUNetRes

  def save(name, fn, *args):
    text = jax.jit(fn).lower(*args).compile().as_text()
    with open(os.path.join(out_dir, name), "w") as f:
      f.write("\n".join(_instructions(text)))

  torch.manual_seed(0)
  sd = {k: v.detach().numpy() for k, v in RefUNetRes(3, 3, 64)
        .state_dict().items()}
  graphdef, state = nnx.split(port_unet_state_dict(sd))
  x = jnp.zeros((4, 256, 256, 3), jnp.float32)
  save("unet_forward", lambda s, x: nnx.merge(graphdef, s)(x), state, x)
  tx = optax.adamw(1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)

  def step(state, opt_state, x, y):
    def loss_fn(s):
      return jnp.mean((nnx.merge(graphdef, s)(x) - y) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(state)
    updates, opt_state = tx.update(grads, opt_state, state)
    return optax.apply_updates(state, updates), opt_state, loss

  save("unet_train_step", step, state, tx.init(state), x, x)

  if hasattr(vit, "inference_copy"):  # trees before efiqa_jax/kernels/
    to_inference = vit.inference_copy
  else:
    from efiqa_jax.kernels import vit_inference  # pylint: disable=g-import-not-at-top
    to_inference = vit_inference.inference_model
  cfg = transformers.DINOv3ViTConfig(
      hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
      intermediate_size=4096, num_register_tokens=4, patch_size=16,
      layer_norm_eps=1e-5, rope_theta=100.0)
  torch.manual_seed(0)
  with tf.TemporaryDirectory() as tmp:
    transformers.DINOv3ViTModel(cfg).save_pretrained(tmp)
    model, _ = port_vit.convert("dinov3", tmp)
  x = jnp.zeros((2, 224, 224, 3), jnp.float32)
  for name, dtype in (("vit_l16_fp32", None), ("vit_l16_bf16", jnp.bfloat16)):
    save(name, lambda m, v: m(v), to_inference(model, dtype), x)


def _run_tree(tree: str, out_dir: str) -> None:
  env = dict(os.environ, PYTHONPATH=tree)  # `efiqa_jax` from `tree`
  code = (f"import sys; sys.path.insert(0, {tree!r}); "
          f"sys.path.insert(0, {os.path.dirname(__file__)!r}); "
          f"import same_program; same_program._dump({out_dir!r})")
  subprocess.run([sys.executable, "-c", code], env=env, check=True,
                 cwd=tree, stdout=subprocess.DEVNULL)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--before", required=True, help="git rev of the A side")
  ap.add_argument("--after", default=None,
                  help="git rev of the B side (default: the working tree)")
  args = ap.parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    trees = {}
    for side, rev in (("before", args.before), ("after", args.after)):
      if rev is None:
        trees[side] = REPO
        continue
      trees[side] = os.path.join(tmp, side)
      subprocess.run(["git", "-C", REPO, "worktree", "add", "-q", "--detach",
                      trees[side], rev], check=True)
    try:
      for side, tree in trees.items():
        os.makedirs(os.path.join(tmp, "hlo_" + side))
        _run_tree(tree, os.path.join(tmp, "hlo_" + side))
      for name in NETWORKS:
        a, b = (open(os.path.join(tmp, "hlo_" + s, name)).read().splitlines()
                for s in ("before", "after"))
        print(json.dumps({"name": name, "identical": a == b,
                          "instructions_before": len(a),
                          "instructions_after": len(b),
                          "before": args.before,
                          "after": args.after or "working tree"}),
              flush=True)
    finally:
      for side, tree in trees.items():
        if tree != REPO:
          subprocess.run(["git", "-C", REPO, "worktree", "remove", "--force",
                          tree], check=False)
  return 0


if __name__ == "__main__":
  sys.exit(main())
