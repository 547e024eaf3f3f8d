"""efiqa train-adapter: distil pseudo-labels into a frozen-encoder adapter."""
NAME = "train-adapter"
HELP = ("Train the student adapter on teacher pseudo-labels (cached features "
        "or end to end); resumes from WORKDIR/checkpoints.")


def add_arguments(p):
  from efiqa_jax import config_util  # pylint: disable=g-import-not-at-top
  config_util.add_config_arguments(
      p, help="adapter[:tiny] or adapter_cp (bundled configs by name) or a "
      "config file[:variant]")
  p.add_argument("--workdir", required=True,
                 help="checkpoints, metrics.jsonl and the adapter (a rerun "
                 "resumes)")
  p.add_argument("positional_overrides", nargs="*", metavar="config.KEY=VALUE",
                 help="config overrides (like --set)")


def run(args) -> int:
  import sys  # pylint: disable=g-import-not-at-top
  from efiqa_jax import config_util  # pylint: disable=g-import-not-at-top
  from efiqa_jax.student import train  # pylint: disable=g-import-not-at-top
  try:
    cfg = config_util.config_from_args(args, args.positional_overrides)
    res = train.train_and_evaluate(cfg, args.workdir)
  except (FileNotFoundError, ValueError) as e:
    print(f"efiqa train-adapter: error: {e}", file=sys.stderr)
    return 2
  print(f"step {res.step}/{res.total_steps} loss {res.final_loss:.5f}"
        + (f"; adapter: {res.adapter_dir}" if res.adapter_dir else
           " (stopped early; run again to resume)"))
  return 0
