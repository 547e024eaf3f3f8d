"""`efiqa vessels`: label-free vessel maps for fundus photographs."""
import argparse

from efiqa_jax import commands

NAME = "vessels"
HELP = ("Segment retinal vessels without weights (multi-scale Hessian); "
        "writes OUT/<id>.png (uint8 probability at the crop size) and "
        "OUT/manifest.csv (with the crop box). Resumable, multi-process.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("inputs", nargs="+",
                      help="image files, folders, globs, a CSV with a "
                      "`path` column, or prepared folders (efiqa prepare "
                      "--size SIZE), or tfds:NAME[:SPLIT] (a built data/ "
                      "dataset)")
  parser.add_argument("--out", required=True, help="output folder (re-running "
                      "into it skips finished images)")
  parser.add_argument("--size", type=int, default=512,
                      help="FOV crop side in pixels (default 512)")
  commands.add_driver_arguments(parser,
                                holds="maps made with other settings")


def run(args: argparse.Namespace) -> int:
  from efiqa_jax import sources, vessel_maps  # pylint: disable=g-import-not-at-top
  res, code = commands.run_driver(NAME, lambda: vessel_maps.segment_paths(
      sources.resolve_inputs(args.inputs), args.out, size=args.size,
      batch_size=args.batch_size, overwrite=args.overwrite,
      read_threads=args.threads, progress=not args.quiet), args.quiet)
  if res is None:
    return code
  print(f"efiqa vessels: {res.ok}/{res.total} segmented ({res.skipped} "
        f"already done); manifest {res.out_dir / 'manifest.csv'}")
  return 0 if res.failed == 0 else 3
