"""`efiqa extract INPUTS --encoder CKPT --out DIR`: ViT patch features."""
from __future__ import annotations

import argparse
import json
import sys

NAME = "extract"
HELP = ("Patch features (gh, gw, D) of a ported ViT encoder for every input "
        "photograph (FOV crop or the whole photograph, EFIQA's resize and "
        "normalisation), sharded and resumable.")


def _mesh(text: str | None):
  if not text:
    return None
  from efiqa_jax import sharding  # pylint: disable=g-import-not-at-top
  return sharding.parse_mesh(text)


def add_arguments(p: argparse.ArgumentParser):
  p.add_argument("inputs", nargs="+",
                 help="files, folders, globs, CSVs with a `path` column, or "
                 "prepared folders (efiqa prepare --size WORK_SIZE; "
                 "--preprocess fov), or tfds:NAME[:SPLIT] (a built data/ "
                 "dataset)")
  p.add_argument("--encoder", required=True,
                 help="efiqa model directory of a ViT (efiqa port dinov3 ...)")
  p.add_argument("--out", required=True, help="output folder")
  p.add_argument("--size", type=int, default=None,
                 help="encoder input side (default: the size the encoder "
                 "records, e.g. what pretrain-encoder trained it at, else "
                 "224)")
  p.add_argument("--work-size", type=int, default=512,
                 help="FOV crop side before the encoder resize (default 512; "
                      "--preprocess fov only)")
  p.add_argument("--preprocess", choices=("efiqa", "fov"), default="fov",
                 help="what the encoder sees. 'fov' (default): the FOV "
                      "crop at --work-size; 'efiqa': the whole photograph "
                      "(EFIQA's extract_dino.py and demo). Both then: PIL "
                      "bicubic (antialiased) resize to --size, /255, "
                      "ImageNet mean/std. An adapter trained on these "
                      "features records it")
  p.add_argument("--no-crop", dest="preprocess", action="store_const",
                 const="efiqa", help="deprecated spelling of --preprocess "
                 "efiqa (default: off; --preprocess decides)")
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
                 help="rule \"('.*mlp.*kernel', (None, 'model'))\" "
                      "(re.fullmatch on the whole parameter path, first "
                      "match wins); repeatable; followed by ('.*', "
                      "'replicate') (default: all replicated)")
  p.add_argument("--read-threads", type=int, default=4,
                 help="decode/FOV threads")
  p.add_argument("--num-workers", type=int, default=0,
                 help="grain decode worker processes (0 = threads only)")
  p.add_argument("--overwrite", action="store_true",
                 help="redo everything when OUT holds features made with "
                      "other settings (refused otherwise, with the "
                      "difference)")
  p.add_argument("--quiet", action="store_true", help="no progress")


def run(args) -> int:
  from efiqa_jax.encoders import extract
  from efiqa_jax import sources
  try:
    mesh = _mesh(args.mesh)
    res = extract.extract_features(
        args.inputs, args.encoder, args.out, size=args.size,
        work_size=args.work_size, preprocess=args.preprocess,
        dtype=args.dtype, save_dtype=args.save_dtype,
        batch_size=args.batch_size, fmt=args.format, mesh_axes=mesh,
        param_sharding=args.param_sharding, shard_size=args.shard_size,
        read_threads=args.read_threads, num_workers=args.num_workers,
        progress=not args.quiet, overwrite=args.overwrite)
  except sources.NoInputsError as e:
    return sources.no_inputs_exit(NAME, e)
  except (FileNotFoundError, ValueError) as e:
    print(f"efiqa extract: error: {e}", file=sys.stderr)
    return 2
  print(json.dumps({"out": args.out, "inputs": res.n, "written": res.written,
                    "skipped": res.skipped, "failed": res.failed,
                    "manifest": res.manifest}))
  return 0 if res.failed_total == 0 else 3
