"""efiqa build-default-model: the recorded recipe of the bundled model."""
NAME = "build-default-model"
HELP = ("Split good photographs (train / calibration / held out), train the "
        "default teacher on the training split's label-free vessel maps, "
        "calibrate it on the calibration split (no quality labels) and write "
        "it; resumes in --workdir.")


def add_arguments(p):
  from efiqa_jax import config_util  # pylint: disable=g-import-not-at-top
  from efiqa_jax import default_model  # pylint: disable=g-import-not-at-top
  p.add_argument("inputs", nargs="+",
                 help="good photographs: folders (a folder with a "
                 "manifest.csv `image` column, e.g. ../shared/data/"
                 "fundus_train, is read through it), files, globs or a CSV")
  config_util.add_config_arguments(p, default_model.DEFAULT_CONFIG)
  p.add_argument("--out", required=True,
                 help="e.g. efiqa_jax/assets/teacher_default (local or "
                 "gs://)")
  p.add_argument("--workdir", default="runs/teacher_default",
                 help="checkpoints and cached vessel maps, local or gs:// "
                 "(resumes)")
  p.add_argument("--quiet", action="store_true",
                 help="no progress bars (default: off)")


def run(args) -> int:
  import sys  # pylint: disable=g-import-not-at-top
  from efiqa_jax import config_util  # pylint: disable=g-import-not-at-top
  from efiqa_jax import default_model  # pylint: disable=g-import-not-at-top
  try:
    meta = default_model.build_default_model(
        args.inputs, args.out, config_spec=args.config, workdir=args.workdir,
        overrides=list(args.overrides) + list(args.config_overrides),
        progress=not args.quiet)
  except (FileNotFoundError, ValueError, config_util.ConfigError) as e:
    print(f"efiqa build-default-model: error: {e}", file=sys.stderr)
    return 2
  from efiqa_jax import runtime  # pylint: disable=g-import-not-at-top
  if not runtime.is_primary():  # one report for the one model
    return 0
  cal = meta["calibration"]
  mp = meta["map"]
  print(f"wrote {args.out}: map |f(x)| > {mp['threshold']:g} over "
        f"{mp['window']} map cells (map AUROC {cal['map_auroc']:.3f}, within "
        f"photographs {cal.get('map_within_auroc', float('nan')):.3f}, on the "
        f"calibration split), grading {meta['grading']}")
  if cal.get("warnings"):  # one line, however many reasons
    print("warning: this calibration is not to be trusted: " +
          "; ".join(cal["warnings"]), file=sys.stderr)
  return 0
