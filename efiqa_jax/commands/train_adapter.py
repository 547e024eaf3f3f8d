"""efiqa train-adapter: distil pseudo-labels into a frozen-encoder adapter."""
NAME = "train-adapter"
HELP = ("Train the student adapter on teacher pseudo-labels (cached features "
        "or end to end); resumes from WORKDIR/checkpoints.")


def add_arguments(p):
  p.add_argument("--config", required=True,
                 help="configs/adapter.py[:tiny] or configs/adapter_cp.py")
  p.add_argument("--workdir", required=True)
  p.add_argument("overrides", nargs="*",
                 help="config.key=value ... (or, after `--`, "
                 "--config.key=value)")
  # main's cli collects --config.KEY=VALUE for commands that opt in.
  p.set_defaults(config_overrides_ok=True)


def run(args) -> int:
  import sys  # pylint: disable=g-import-not-at-top
  from efiqa_jax import config_util  # pylint: disable=g-import-not-at-top
  from efiqa_jax.student import train  # pylint: disable=g-import-not-at-top
  try:
    cfg = config_util.load_config(args.config,
                                  list(args.overrides) + list(
        getattr(args, "config_overrides", None) or []))
    res = train.train_and_evaluate(cfg, args.workdir)
  except (FileNotFoundError, ValueError) as e:
    print(f"efiqa train-adapter: error: {e}", file=sys.stderr)
    return 2
  print(f"step {res.step}/{res.total_steps} loss {res.final_loss:.5f}"
        + (f"; adapter: {res.adapter_dir}" if res.adapter_dir else
           " (stopped early; run again to resume)"))
  return 0
