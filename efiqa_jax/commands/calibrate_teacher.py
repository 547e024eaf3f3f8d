"""efiqa calibrate-teacher: a trained teacher's thresholds, label-free."""
NAME = "calibrate-teacher"
HELP = ("Measure a trained teacher's map rule, grade cut-offs and "
        "pseudo-label rule on good photographs it did not train on, their "
        "synthetic degradations and vessel erasures (no quality labels); "
        "write the teacher with them to --out.")


def add_arguments(p):
  p.add_argument("teacher", help="teacher model directory, local or gs:// "
                 "(efiqa train-teacher's WORKDIR/export, or a ported VUAD)")
  p.add_argument("--out", required=True,
                 help="calibrated copy to write (local or gs://)")
  p.add_argument("--photos", nargs="+", default=[],
                 help="good photographs (folders, files, globs, CSV); "
                 "without them: synthetic photographs and scikit-image's "
                 "retina photograph")
  p.add_argument("--split", default="calibration",
                 choices=("calibration", "heldout", "train", "all"),
                 help="which split of --photos to use (teacher.data."
                 "assign_splits; 'all' = every photograph, e.g. a folder "
                 "kept apart from training)")
  p.add_argument("--work-size", type=int, default=None,
                 help="FOV crop side the teacher assesses at (default: the "
                 "teacher's own, else 512)")
  p.add_argument("--n", type=int, default=96,
                 help="synthetic photographs when no --photos are given")
  p.add_argument("--label-grid", type=int, default=32,
                 help="cells per side the pseudo-label rule is fitted on")
  p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
  import sys  # pylint: disable=g-import-not-at-top
  from efiqa_jax import runtime  # pylint: disable=g-import-not-at-top
  from efiqa_jax.teacher import calibration  # pylint: disable=g-import-not-at-top
  command = " ".join(
      ["efiqa calibrate-teacher", args.teacher, "--out", args.out] +
      (["--photos", *args.photos, "--split", args.split] if args.photos
       else ["--n", str(args.n)]) +
      (["--work-size", str(args.work_size)] if args.work_size else []) +
      (["--label-grid", str(args.label_grid)] if args.label_grid != 32
       else []))
  try:
    meta = calibration.calibrate_teacher(
        args.teacher, args.out, photos=args.photos, split=args.split,
        work_size=args.work_size, n=args.n, label_grid=args.label_grid,
        progress=not args.quiet, command=command)
  except (FileNotFoundError, ValueError) as e:
    print(f"efiqa calibrate-teacher: error: {e}", file=sys.stderr)
    return 2
  if not runtime.is_primary():  # one report for the one calibration
    return 0
  cal, pl, mp = meta["calibration"], meta["pseudo_labels"], meta["map"]
  print(f"wrote {args.out}: map |f(x)| > {mp['threshold']:g} over "
        f"{mp['window']} map cells (map AUROC {cal['map_auroc']:.3f}, within "
        f"photographs {cal.get('map_within_auroc', float('nan')):.3f}), "
        f"grading {meta['grading']}, pseudo-labels |f(x)| > "
        f"{pl['threshold']:g} on >= {pl['relax']:g} of a "
        f"{pl['grid']}x{pl['grid']} cell (balanced "
        f"accuracy {cal['label_balanced_accuracy']:.3f})")
  if cal.get("warnings"):  # one line, however many reasons
    print("warning: this calibration is not to be trusted: " +
          "; ".join(cal["warnings"]), file=sys.stderr)
  return 0
