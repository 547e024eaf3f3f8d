"""VUAD `unet_res` (penway/EFIQA) .pth -> efiqa model directory.

Torch state-dict layout (every tensor stored twice, see efiqa_jax.port):

  conv{i}.conv{j}.{weight,bias}      == conv{i}.conv_block.{0|2}.{weight,bias}
        i = 1..9 (encoder 1-5, decoder 6-9), j = 1, 2 (Sequential index 0, 2)
  upconv{k}.conv.{weight,bias}       == upconv{k}.conv_block.0.{weight,bias}
        k = 1..4
  outconv.{weight,bias}

Sizes (in/out channels, base width) are inferred from the tensors.
"""
from __future__ import annotations

import os
import pathlib
from typing import Any

import numpy as np

from efiqa_jax.port import common

ARCH_NOTE = ("VUAD unet_res (penway/EFIQA vuad/model/unet_res.py): x + f(x), "
             "ReLU (the activf=SiLU argument is unused upstream)")


def unet_rules(prefix: str = "", target_prefix: tuple[str, ...] = ()
               ) -> list[common.Rule]:
  """Mapping for one reference UNetModule whose keys start with `prefix`."""
  rules = []
  for i in range(1, 10):
    for j, seq in ((1, 0), (2, 2)):
      for name, tname, hook in (("weight", "kernel", common.conv_kernel),
                                ("bias", "bias", None)):
        rules.append(common.Rule(
            target_prefix + (f"conv{i}", f"conv{j}", tname),
            (f"{prefix}conv{i}.conv{j}.{name}",
             f"{prefix}conv{i}.conv_block.{seq}.{name}"), hook))
  for k in range(1, 5):
    for name, tname, hook in (("weight", "kernel",
                               common.conv_transpose_kernel),
                              ("bias", "bias", None)):
      rules.append(common.Rule(
          target_prefix + (f"upconv{k}", tname),
          (f"{prefix}upconv{k}.conv.{name}",
           f"{prefix}upconv{k}.conv_block.0.{name}"), hook))
  rules.append(common.Rule(target_prefix + ("outconv", "kernel"),
                           (f"{prefix}outconv.weight",), common.conv_kernel))
  rules.append(common.Rule(target_prefix + ("outconv", "bias"),
                           (f"{prefix}outconv.bias",)))
  return rules


def infer_unet_sizes(sd: dict[str, np.ndarray], prefix: str = ""
                     ) -> dict[str, int]:
  """in_channels / out_channels / base_channels from the tensors."""
  need = (f"{prefix}conv1.conv1.weight", f"{prefix}outconv.weight")
  absent = [k for k in need if k not in sd]
  if absent:
    raise common.PortError("cannot infer U-Net sizes", absent=absent)
  w1, wo = sd[need[0]], sd[need[1]]
  if w1.ndim != 4 or wo.ndim != 4:
    raise common.PortError("cannot infer U-Net sizes", shape=[
        f"{need[0]}: {w1.shape}", f"{need[1]}: {wo.shape}"])
  return dict(in_channels=int(w1.shape[1]), out_channels=int(wo.shape[0]),
              base_channels=int(w1.shape[0]))


def port_unet_state_dict(sd: dict[str, np.ndarray], *, residual: bool = True,
                         dtype: Any = None, what: str = "VUAD checkpoint"):
  """State dict -> filled efiqa_jax UNet (strict)."""
  import jax.numpy as jnp
  from flax import nnx
  from efiqa_jax.models.unet import UNet

  sizes = infer_unet_sizes(sd)
  model = nnx.eval_shape(lambda: UNet(
      **sizes, residual=residual, dtype=dtype or jnp.float32,
      rngs=nnx.Rngs(0)))
  common.apply_mapping(model, sd, unet_rules(), what=what)
  return model


def port_vuad(src: str | os.PathLike, out: str | os.PathLike, *,
              residual: bool = True, overwrite: bool = False):
  """Convert a VUAD `unet_res` .pth/.safetensors into an efiqa model dir.

  Returns (model, meta).
  """
  from efiqa_jax import checkpoints

  src = pathlib.Path(src)
  sd, notes = common.load_state_dict(src)
  model = port_unet_state_dict(sd, residual=residual, what=str(src))
  meta = {
      "source": {"path": str(src.absolute()), "sha256": common.sha256_file(src),
                 "format": "torch state dict (VUAD unet_res)",
                 "tensors": len(sd), **notes},
      "description": ARCH_NOTE,
      # What VUAD's infer.py feeds the model (vuad/infer.py `process`).
      "preprocessing": {
          "input": "vessel map, RGB (3 equal channels), float in [0, 1]",
          "gray_threshold": 50, "size": 256,
          "anomaly": "mean over channels of |f(x)|, pixel threshold 0.02",
      },
  }
  checkpoints.save_model(out, model, meta, overwrite=overwrite)
  return model, meta
