"""`efiqa train-teacher`: train the VUAD teacher (masked vessel-map inpainting)."""
NAME = "train-teacher"
HELP = ("Train the VUAD teacher U-Net by masked inpainting of vessel maps "
        "(resumes automatically from WORKDIR; exports to WORKDIR/export).")


def add_arguments(parser):
  from efiqa_jax import config_util  # pylint: disable=g-import-not-at-top
  config_util.add_config_arguments(
      parser, "teacher",
      help="a bundled config by name[:variant] (teacher, teacher:tiny, "
      "teacher:b32) or a config file[:variant]")
  parser.add_argument("--workdir", required=True,
                      help="checkpoints, TensorBoard logs and the export go here")
  parser.epilog += (" E.g. --config.data.source=folder "
                    "--config.data.path=maps/")


def run(args) -> int:
  import logging  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from efiqa_jax import config_util  # pylint: disable=g-import-not-at-top
  from efiqa_jax.teacher import train  # pylint: disable=g-import-not-at-top
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  try:  # Multi-host when launched under a coordinator; no-op on one host.
    jax.distributed.initialize()
  except (ValueError, RuntimeError):
    pass
  config = config_util.config_from_args(args)
  try:
    res = train.train_and_evaluate(config, args.workdir)
  except train.NonFiniteLossError as e:
    print(f"error: {e}")
    return 1
  print(f"trained {res.step}/{res.total_steps} steps; "
        f"final loss {res.history[-1][1] if res.history else float('nan'):.5g}; "
        f"model exported to {res.export_dir}")
  return 0
