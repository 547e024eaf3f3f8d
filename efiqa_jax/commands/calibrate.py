"""efiqa calibrate: fit the paper's weighted pooling W and threshold tau."""
NAME = "calibrate"
HELP = ("Fit image-level pooling (W, tau; stratified K-fold report) on "
        "`efiqa assess` maps + binary labels; writes the file that "
        "`efiqa assess --calibration` reads.")


def add_arguments(p):
  p.add_argument("assess_dir", help="efiqa assess output (scores.csv, maps/)")
  p.add_argument("--labels", required=True,
                 help="CSV with id or image + label column")
  p.add_argument("--out", required=True, help="calibration JSON to write")
  p.add_argument("--label-column", default="label",
                 help="column of --labels holding the label")
  p.add_argument("--positive", default="1",
                 help="label value meaning acceptable quality")
  p.add_argument("--folds", type=int, default=5,
                 help="stratified folds of the out-of-fold report")
  p.add_argument("--steps", type=int, default=50000,
                 help="AdamW iterations (paper: 50,000)")
  p.add_argument("--batch-size", type=int, default=32,
                 help="images per AdamW step")
  p.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate")
  p.add_argument("--seed", type=int, default=0, help="folds and batches")


def run(args) -> int:
  import json  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from efiqa_jax import calibrate  # pylint: disable=g-import-not-at-top
  try:
    cal = calibrate.calibrate(
        args.assess_dir, args.labels, args.out, label_column=args.label_column,
        positive=args.positive, folds=args.folds, steps=args.steps,
        batch=args.batch_size, lr=args.lr, seed=args.seed)
  except (FileNotFoundError, ValueError) as e:
    print(f"efiqa calibrate: error: {e}", file=sys.stderr)
    return 2
  print(json.dumps({"out": args.out, **cal["cv"]}))
  return 0
