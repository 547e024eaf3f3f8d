"""efiqa train-eyeq-head: the paper's EyeQ 3-class head (option 2)."""
NAME = "train-eyeq-head"
HELP = ("Fit the EyeQ 3-class linear head on frozen features with the "
        "map-consistency regulariser (frozen adapter's map).")


def add_arguments(p):
  p.add_argument("--features", required=True, help="efiqa extract output")
  p.add_argument("--adapter", required=True, help="frozen adapter directory")
  p.add_argument("--labels", required=True,
                 help="CSV: id or image + label (good/usable/reject or 0/1/2)")
  p.add_argument("--out", required=True, help="head model directory")
  p.add_argument("--label-column", default="label",
                 help="column of --labels holding the class")
  p.add_argument("--epochs", type=int, default=120, help="paper: 120")
  p.add_argument("--batch-size", type=int, default=32, help="paper: 32")
  p.add_argument("--lr", type=float, default=1e-3,
                 help="AdamW learning rate (paper: 1e-3)")
  p.add_argument("--lam", type=float, default=1.0,
                 help="weight of the map-consistency MSE")
  p.add_argument("--seed", type=int, default=0, help="initialisation and "
                 "batches")


def run(args) -> int:
  import sys  # pylint: disable=g-import-not-at-top
  from efiqa_jax.student import eyeq_head  # pylint: disable=g-import-not-at-top
  try:
    meta = eyeq_head.train_eyeq_head(
        args.features, args.adapter, args.labels, args.out,
        label_column=args.label_column, epochs=args.epochs,
        batch=args.batch_size, lr=args.lr, lam=args.lam, seed=args.seed)
  except (FileNotFoundError, ValueError) as e:
    print(f"efiqa train-eyeq-head: error: {e}", file=sys.stderr)
    return 2
  t = meta["training"]
  print(f"{t['n']} images, final loss {t['final_loss']:.4f}; {args.out}")
  return 0
