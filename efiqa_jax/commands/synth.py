"""`efiqa synth`: write a synthetic fundus dataset (thin shell over write_dataset)."""
import argparse

NAME = "synth"
HELP = ("Generate synthetic fundus photographs with vessel ground truth and "
        "degradation masks (images/, vessels/, degradation/, labels.csv).")


def _fraction(s: str) -> float:
  v = float(s)
  if not 0.0 <= v <= 1.0:
    raise argparse.ArgumentTypeError(f"must be in [0, 1], got {s}")
  return v


# Spelled out (and checked against efiqa_jax.synth.KINDS in the tests) so that
# `efiqa --help` does not import numpy/scipy.
KINDS_HELP = ("blur,motion,illumination,shadow,overexposure,glare,haze,eyelash,"
              "dust,noise,jpeg")


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--n", type=int, required=True, help="number of images")
  p.add_argument("--out", required=True, help="output folder")
  p.add_argument("--seed", type=int, default=0,
                 help="dataset seed; image i uses SeedSequence([seed, i]) (default 0)")
  p.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
  p.add_argument("--clean-fraction", type=_fraction, default=0.3,
                 help="probability that an image is left undegraded (default 0.3)")
  p.add_argument("--lesion-fraction", type=_fraction, default=0.35,
                 help="probability that an image has lesions (default 0.35)")
  p.add_argument("--no-lesions", action="store_true", help="never draw lesions")
  p.add_argument("--kinds", default=None,
                 help=("comma-separated degradation kinds that degraded images draw "
                       f"1-3 from (default all: {KINDS_HELP})"))
  p.add_argument("--overwrite", action="store_true",
                 help="write into a folder that already has a labels.csv")
  p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
  import sys
  from efiqa_jax import driver
  from efiqa_jax.synth import write_dataset
  from efiqa_jax.synth.degradations import parse_kinds
  try:
    if args.kinds is not None:  # validated before anything is written
      parse_kinds(args.kinds)
    driver.output_dir(args.out)  # a file or a read-only folder: one line
    path = write_dataset(args.out, args.n, args.seed, args.size,
                         clean_fraction=args.clean_fraction,
                         lesion_fraction=args.lesion_fraction,
                         lesions=not args.no_lesions, kinds=args.kinds,
                         overwrite=args.overwrite, progress=not args.quiet)
  except (ValueError, FileExistsError) as e:   # bad options: one clear line
    print(f"efiqa synth: error: {e}", file=sys.stderr)
    return 2
  print(path)
  return 0
