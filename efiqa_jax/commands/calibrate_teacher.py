"""efiqa calibrate-teacher: a trained teacher's thresholds, label-free."""
NAME = "calibrate-teacher"
HELP = ("Measure a trained teacher's map threshold, grade cutoffs and "
        "pseudo-label rule on synthetic vessel erasures (no quality labels); "
        "write the teacher with them to --out.")


def add_arguments(p):
  p.add_argument("teacher", help="teacher model directory (efiqa "
                 "train-teacher's WORKDIR/export, or a ported VUAD)")
  p.add_argument("--out", required=True, help="calibrated copy to write")
  p.add_argument("--work-size", type=int, default=None,
                 help="FOV crop side the teacher assesses at (default: the "
                 "teacher's own, else 512)")
  p.add_argument("--n", type=int, default=96,
                 help="synthetic photographs (plus 32 erasure draws on "
                 "scikit-image's retina photograph)")
  p.add_argument("--label-grid", type=int, default=32,
                 help="cells per side the pseudo-label rule is fitted on")
  p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
  import sys  # pylint: disable=g-import-not-at-top
  from efiqa_jax import default_model  # pylint: disable=g-import-not-at-top
  try:
    meta = default_model.calibrate_teacher(
        args.teacher, args.out, work_size=args.work_size, n=args.n,
        label_grid=args.label_grid, progress=not args.quiet)
  except (FileNotFoundError, ValueError) as e:
    print(f"efiqa calibrate-teacher: error: {e}", file=sys.stderr)
    return 2
  cal, pl = meta["calibration"], meta["pseudo_labels"]
  print(f"wrote {args.out}: map threshold {meta['anomaly_threshold']:g} "
        f"(erasure AUROC {cal['map_auroc']:.3f}), grading {meta['grading']}, "
        f"pseudo-labels |f(x)| > {pl['threshold']:g} on >= {pl['relax']:g} of "
        f"a {pl['grid']}x{pl['grid']} cell (balanced accuracy "
        f"{cal['label_balanced_accuracy']:.3f})")
  return 0
