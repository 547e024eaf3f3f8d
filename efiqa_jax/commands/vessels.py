"""`efiqa vessels`: label-free vessel maps for fundus photographs."""
import argparse

NAME = "vessels"
HELP = ("Segment retinal vessels without weights (multi-scale Hessian); "
        "writes OUT/<id>.png (uint8 probability at the crop size) and "
        "OUT/manifest.csv.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("inputs", nargs="+",
                      help="image files, folders, globs or a CSV with a "
                      "`path` column")
  parser.add_argument("--out", required=True, help="output folder")
  parser.add_argument("--size", type=int, default=512,
                      help="FOV crop side in pixels (default 512)")
  parser.add_argument("--batch-size", type=int, default=8,
                      help="images per jitted call (default 8)")


def run(args: argparse.Namespace) -> int:
  import csv  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from efiqa_jax import vessels  # pylint: disable=g-import-not-at-top
  from efiqa_jax import sources  # pylint: disable=g-import-not-at-top
  try:
    paths = sources.list_inputs(args.inputs)
  except sources.NoInputsError as e:
    return sources.no_inputs_exit(NAME, e)
  except ValueError as e:
    print(f"efiqa vessels: error: {e}", file=sys.stderr)
    return 2
  manifest = vessels.segment_paths(paths, args.out, size=args.size,
                                   batch_size=args.batch_size, log=print)
  with open(manifest, newline="") as f:
    rows = list(csv.DictReader(f))
  ok = sum(r["status"] == "ok" for r in rows)
  print(f"efiqa vessels: {ok}/{len(rows)} segmented; manifest {manifest}")
  for r in rows:
    if r["status"] != "ok":
      print(f"  {r['status']}: {r['image']}: {r['message']}")
  return 0 if ok else 1
