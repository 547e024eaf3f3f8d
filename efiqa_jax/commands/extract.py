"""`efiqa extract INPUTS --encoder CKPT --out DIR`: ViT patch features."""
from __future__ import annotations

import argparse
import json

NAME = "extract"
HELP = ("Patch features (gh, gw, D) of a ported ViT encoder for every input "
        "photograph (FOV crop + EFIQA preprocessing), sharded and resumable.")


def _mesh(text: str | None):
  if not text:
    return None
  axes = []
  for part in text.split(","):
    name, _, n = part.partition(":")
    axes.append((name.strip(), int(n)))
  return axes


def add_arguments(p: argparse.ArgumentParser):
  p.add_argument("inputs", nargs="+",
                 help="files, folders, globs or CSVs with a `path` column")
  p.add_argument("--encoder", required=True,
                 help="efiqa model directory of a ViT (efiqa port dinov3 ...)")
  p.add_argument("--out", required=True, help="output folder")
  p.add_argument("--size", type=int, default=None,
                 help="encoder input side (default: the size the encoder "
                 "records, e.g. what pretrain-encoder trained it at, else "
                 "224)")
  p.add_argument("--work-size", type=int, default=512,
                 help="FOV crop side before the encoder resize (default 512)")
  p.add_argument("--no-crop", action="store_true",
                 help="resize the whole photograph (reference extractor) "
                      "instead of the FOV crop")
  p.add_argument("--dtype", choices=("float32", "bfloat16"),
                 default="float32", help="compute dtype")
  p.add_argument("--save-dtype", choices=("float32", "float16"),
                 default="float32", help="dtype of the saved features")
  p.add_argument("--batch-size", type=int, default=32,
                 help="global batch (rounded up to the data shards)")
  p.add_argument("--format", choices=("npy", "arrayrecord"), default="npy",
                 help="one .npy per image, or ArrayRecord shards")
  p.add_argument("--shard-size", type=int, default=4096,
                 help="records per ArrayRecord shard")
  p.add_argument("--mesh", default=None,
                 help="mesh axes, e.g. 'data:-1,model:2' (default all "
                      "devices on data)")
  p.add_argument("--param-sharding", action="append", default=None,
                 help="rule \"('.*mlp.*kernel', (None, 'model'))\"; "
                      "repeatable; unmatched parameters are replicated "
                      "(default: all replicated)")
  p.add_argument("--read-threads", type=int, default=4,
                 help="decode/FOV threads")
  p.add_argument("--num-workers", type=int, default=0,
                 help="grain decode worker processes (0 = threads only)")


def run(args) -> int:
  import sys
  from efiqa_jax import features
  from efiqa_jax import sources
  try:
    res = features.extract_features(
        args.inputs, args.encoder, args.out, size=args.size,
        work_size=args.work_size, crop=not args.no_crop, dtype=args.dtype,
        save_dtype=args.save_dtype, batch_size=args.batch_size,
        fmt=args.format, mesh_axes=_mesh(args.mesh),
        param_sharding=args.param_sharding, shard_size=args.shard_size,
        read_threads=args.read_threads, num_workers=args.num_workers,
        progress=True)
  except sources.NoInputsError as e:
    return sources.no_inputs_exit(NAME, e)
  except (FileNotFoundError, ValueError) as e:
    print(f"efiqa extract: error: {e}", file=sys.stderr)
    return 2
  print(json.dumps({"out": args.out, "inputs": res.n, "written": res.written,
                    "skipped": res.skipped, "failed": res.failed,
                    "manifest": res.manifest}))
  return 0
