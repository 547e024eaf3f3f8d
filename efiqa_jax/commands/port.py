"""`efiqa port SOURCE_KIND SRC --out DIR`: convert PyTorch weights.

Each converter is one entry in CONVERTERS: (help, add_arguments, run). Add a
new source family (e.g. dinov3) by registering another entry.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

NAME = "port"
HELP = "Convert PyTorch weights (VUAD, RRWNet/R2-V2, ...) into efiqa models."


def _vuad_args(p: argparse.ArgumentParser):
  p.add_argument("--plain", action="store_true",
                 help="plain U-Net f(x) instead of unet_res x + f(x)")


def _vuad_run(args) -> tuple:
  from efiqa_jax.port.vuad import port_vuad
  return port_vuad(args.src, args.out, residual=not args.plain,
                   overwrite=args.overwrite)


def _rrwnet_args(p: argparse.ArgumentParser):
  p.add_argument("--config", default=None,
                 help="R2-V2 *_config.json (in/out/base channels, "
                      "num_iterations); default: RRWNet's own settings")
  p.add_argument("--iterations", type=int, default=None,
                 help="refinement iterations without --config (default 5)")
  p.add_argument("--model-type", choices=("bv", "av", "rrwnet"), default=None,
                 help="default: bv for 6 input channels, else av")


def _rrwnet_run(args) -> tuple:
  from efiqa_jax.port.rrwnet import port_rrwnet
  return port_rrwnet(args.src, args.out, config=args.config,
                     iterations=args.iterations, model_type=args.model_type,
                     overwrite=args.overwrite)


# kind -> (help, add_arguments(parser), run(args) -> (model, meta))
CONVERTERS: dict[str, tuple[str, Callable, Callable]] = {
    "vuad": ("VUAD unet_res .pth (penway/EFIQA) -> U-Net", _vuad_args,
             _vuad_run),
    "rrwnet": ("RRWNet / R2-V2 bv|av .pth (+ config JSON) -> RRWNet",
               _rrwnet_args, _rrwnet_run),
}


def register_converter(kind: str, help: str, add_arguments: Callable,
                       run: Callable):
  CONVERTERS[kind] = (help, add_arguments, run)


def _register_families():
  # ViT foundation encoders (dinov3, dinov2, dinov2reg, retfound, timm-vit);
  # efiqa_jax.port.vit imports only numpy at module level.
  from efiqa_jax.port import vit as vit_port
  vit_port.register(register_converter)
  from efiqa_jax.port import adapter as adapter_port
  adapter_port.register(register_converter)


_register_families()


def add_arguments(parser: argparse.ArgumentParser):
  sub = parser.add_subparsers(dest="kind", metavar="KIND", required=True)
  for kind, (hlp, add, _) in CONVERTERS.items():
    p = sub.add_parser(kind, help=hlp, description=hlp,
                       formatter_class=parser.formatter_class)
    p.add_argument("src", help="source weights (.pth / .safetensors, or a "
                   "Hugging Face snapshot folder)")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty output directory")
    add(p)
    p.set_defaults(_convert=kind)


def run(args) -> int:
  from efiqa_jax.port.common import PortError
  _, _, convert = CONVERTERS[args._convert]
  try:
    model, meta = convert(args)
  except ImportError as e:
    if (e.name or "").split(".")[0] not in ("torch", "transformers",
                                            "safetensors"):
      raise
    print(f"efiqa port {args._convert}: needs the port extra (missing "
          f"{e.name}): pip install 'efiqa-jax[port]'", file=sys.stderr)
    return 2
  except (PortError, FileNotFoundError, FileExistsError, ValueError) as e:
    print(f"efiqa port {args._convert}: error: {e}", file=sys.stderr)
    return 1
  print(json.dumps({"out": args.out, "architecture": type(model).ARCH,
                    "kwargs": model.config(),
                    "sha256": meta["source"]["sha256"]}))
  return 0
