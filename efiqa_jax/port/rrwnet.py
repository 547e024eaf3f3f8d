"""RRWNet / R2-V2 .pth (+ optional config JSON) -> efiqa model directory.

State dict: `first_u.` and `second_u.` each hold a reference UNetModule with
the duplicated conv / conv_block layout (see efiqa_jax.port.vuad). R2-V2 ships
`bv.pth` + `bv_config.json` and `av.pth` + `av_config.json`; the config has
`in_channels`, `out_channels`, `base_channels`, `num_iterations`. Without a
config the sizes are inferred from the tensors and `iterations` (which the
weights cannot tell) defaults to 5, RRWNet's default.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any

from efiqa_jax.port import common
from efiqa_jax.port.vuad import infer_unet_sizes, unet_rules

DEFAULT_ITERATIONS = 5


def rrwnet_rules() -> list[common.Rule]:
  return (unet_rules("first_u.", ("first_u",)) +
          unet_rules("second_u.", ("second_u",)))


def _read_config(path) -> dict:
  cfg = json.loads(pathlib.Path(path).read_text())
  need = ("in_channels", "out_channels", "base_channels", "num_iterations")
  absent = [k for k in need if k not in cfg]
  if absent:
    raise ValueError(f"{path}: config lacks {absent}")
  return cfg


def port_rrwnet_state_dict(sd, *, in_channels: int | None = None,
                           base_channels: int | None = None,
                           out_channels: int | None = None,
                           iterations: int = DEFAULT_ITERATIONS,
                           dtype: Any = None, what: str = "RRWNet checkpoint"):
  """State dict -> filled efiqa_jax RRWNet (strict). Given sizes must match."""
  import jax.numpy as jnp
  from flax import nnx
  from efiqa_jax.models.rrwnet import RRWNet

  sizes = infer_unet_sizes(sd, "first_u.")
  given = dict(in_channels=in_channels, out_channels=out_channels,
               base_channels=base_channels)
  wrong = [f"{k}: config {v} != weights {sizes[k]}"
           for k, v in given.items() if v is not None and v != sizes[k]]
  if wrong:
    raise common.PortError(f"{what}: config disagrees with the weights",
                           shape=wrong)
  model = nnx.eval_shape(lambda: RRWNet(
      **sizes, iterations=iterations, dtype=dtype or jnp.float32,
      rngs=nnx.Rngs(0)))
  common.apply_mapping(model, sd, rrwnet_rules(), what=what)
  return model


def port_rrwnet(src: str | os.PathLike, out: str | os.PathLike, *,
                config: str | os.PathLike | None = None,
                iterations: int | None = None,
                model_type: str | None = None, overwrite: bool = False):
  """Convert an RRWNet / R2-V2 checkpoint into an efiqa model directory.

  Args:
    config: R2-V2 `*_config.json` (sizes + num_iterations), optional.
    iterations: refinement iterations when no config is given (default 5).
    model_type: "bv" / "av" (R2-V2) or "rrwnet"; default "bv" for 6 input
      channels (preprocessed + raw image), else "av".
  Returns:
    (model, meta).
  """
  from efiqa_jax import checkpoints

  src = pathlib.Path(src)
  sd, notes = common.load_state_dict(src)
  cfg = _read_config(config) if config is not None else {}
  if cfg and iterations is not None and iterations != cfg["num_iterations"]:
    raise ValueError(f"iterations={iterations} contradicts {config} "
                     f"num_iterations={cfg['num_iterations']}")
  iters = cfg.get("num_iterations", iterations if iterations is not None
                  else DEFAULT_ITERATIONS)
  model = port_rrwnet_state_dict(
      sd, in_channels=cfg.get("in_channels"),
      out_channels=cfg.get("out_channels"),
      base_channels=cfg.get("base_channels"), iterations=int(iters),
      what=str(src))
  if model_type is None:
    model_type = "bv" if model.in_channels == 6 else "av"
  if model_type not in ("bv", "av", "rrwnet"):
    raise ValueError(f"model_type must be bv, av or rrwnet, got "
                     f"{model_type!r}")
  if model_type == "bv" and model.in_channels != 6:
    raise ValueError(f"R2-V2 bv takes 6 input channels, weights have "
                     f"{model.in_channels}")
  source = {"path": str(src.absolute()), "sha256": common.sha256_file(src),
            "format": "torch state dict (RRWNet)", "tensors": len(sd), **notes}
  if config is not None:
    source["config"] = str(pathlib.Path(config).absolute())
    source["config_json"] = cfg
    source["config_sha256"] = common.sha256_file(config)
  meta = {
      "source": source,
      "model_type": model_type,
      "description": "RRWNet (j-morano/rrwnet model.py); outputs [a, v, bv] "
                     "logits, last refinement stage",
      "preprocessing": {
          "function": "efiqa_jax.models.rrwnet.r2v2_inputs",
          "model_type": "av" if model_type == "rrwnet" else model_type,
          "width": 1408, "pad_multiple": 32,
          "input_channels": ("R2-V2 enhanced + CLAHE (3) + raw RGB [0,1] (3)"
                             if model.in_channels == 6 else
                             "R2-V2 enhanced + CLAHE (3)"),
          "output": "sigmoid(logits) [a, v, bv], zero outside the mask",
      },
  }
  checkpoints.save_model(out, model, meta, overwrite=overwrite)
  return model, meta
