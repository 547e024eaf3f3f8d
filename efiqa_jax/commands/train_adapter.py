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
  p.add_argument("--preprocess", choices=("efiqa", "fov"), default=None,
                 help="config.preprocess: end to end, what the encoder sees "
                 "('fov', the default: the FOV crop; 'efiqa': the whole "
                 "photograph); with features, their metadata.json decides "
                 "and this must agree. The adapter records it")
  config_util.add_trainer_arguments(p)
  p.add_argument("positional_overrides", nargs="*", metavar="config.KEY=VALUE",
                 help="config overrides (like --set)")


def run(args) -> int:
  from efiqa_jax import commands  # pylint: disable=g-import-not-at-top
  from efiqa_jax import config_util  # pylint: disable=g-import-not-at-top
  from efiqa_jax import runtime  # pylint: disable=g-import-not-at-top
  from efiqa_jax.student import train  # pylint: disable=g-import-not-at-top
  cfg = config_util.config_from_args(args, args.positional_overrides)
  if args.preprocess:
    with cfg.unlocked():
      cfg.preprocess = args.preprocess
  res, code = commands.run_training(
      NAME, lambda: train.train_and_evaluate(cfg, args.workdir))
  if code is not None:
    return code
  if runtime.is_primary():
    print(f"step {res.step}/{res.total_steps} loss {res.final_loss:.5f}"
          + (f"; adapter: {res.adapter_dir}" if res.adapter_dir else
             " (stopped early; run again to resume)"))
  return runtime.EXIT_OK
