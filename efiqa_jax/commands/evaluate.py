"""efiqa evaluate: image-level (K-fold threshold protocol), EyeQ 3-class and
FunPiQ pixel-level metrics with bootstrap CIs."""
NAME = "evaluate"
HELP = ("Evaluate scores.csv / maps against labels: binary (BAcc, F1, MCC, "
        "AUROC, AUPRC), eyeq (acc, macro P/R/F1, QWK) or pixel (QWK, Dice, "
        "AUROC, AUPRC, sens@95%spec); metrics.json + metrics.md.")


def add_arguments(p):
  p.add_argument("--scores", required=True, help="efiqa assess scores.csv")
  p.add_argument("--labels", default=None,
                 help="labels CSV (id or image column + label column), or "
                 "tfds:NAME[/CONFIG]:SPLIT[:FEATURE] (a built data/ dataset; "
                 "the class name is the label); default: none (required "
                 "except for --task pixel)")
  p.add_argument("--tfds-data-dir", default=None,
                 help="TFDS data_dir of tfds: labels (default: TFDS's own, "
                 "~/tensorflow_datasets)")
  p.add_argument("--task", choices=("binary", "eyeq", "pixel"),
                 default="binary",
                 help="binary (K-fold threshold protocol), eyeq (3 classes) "
                 "or pixel (FunPiQ maps)")
  p.add_argument("--out", required=True,
                 help="folder for metrics.json and metrics.md")
  p.add_argument("--label-column", default="label",
                 help="column of --labels holding the label")
  p.add_argument("--score-column", default="quality",
                 help="binary: column of --scores holding the score")
  p.add_argument("--positive", default="1",
                 help="binary: label value of the positive class")
  p.add_argument("--lower-is-positive", action="store_true",
                 help="binary: low scores mean the positive class")
  p.add_argument("--pred-column", default="grade",
                 help="eyeq: predicted class column")
  p.add_argument("--folds", type=int, default=5,
                 help="binary: stratified folds (fewer when a class has "
                 "fewer images; said in the output and metrics.json)")
  p.add_argument("--seed", type=int, default=0,
                 help="folds and bootstrap resamples")
  p.add_argument("--bootstrap", type=int, default=1000,
                 help="bootstrap resamples of the confidence intervals")
  p.add_argument("--maps", default=None, help="pixel: assess maps/ folder "
                 "(default: maps/ beside --scores)")
  p.add_argument("--annotations", default=None,
                 help="pixel: FunPiQ indexed PNG folder (default: none; "
                 "required for --task pixel)")


def run(args) -> int:
  import sys  # pylint: disable=g-import-not-at-top
  from efiqa_jax import evaluate  # pylint: disable=g-import-not-at-top
  if args.task != "pixel" and not args.labels:
    print("efiqa evaluate: error: --labels is required", file=sys.stderr)
    return 2
  try:
    res = evaluate.evaluate(
        args.scores, args.labels, args.out, task=args.task,
        label_column=args.label_column, score_column=args.score_column,
        positive=args.positive, higher_is_positive=not args.lower_is_positive,
        pred_column=args.pred_column, folds=args.folds, seed=args.seed,
        bootstrap=args.bootstrap, maps_dir=args.maps,
        annotations_dir=args.annotations, tfds_data_dir=args.tfds_data_dir)
  except (FileNotFoundError, ValueError, KeyError) as e:
    print(f"efiqa evaluate: error: {e}", file=sys.stderr)
    return 2
  print(evaluate.markdown(res))
  return 0
