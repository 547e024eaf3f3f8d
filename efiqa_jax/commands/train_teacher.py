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
                      help="checkpoints, metrics, TensorBoard events and the "
                           "export go here (a rerun resumes)")
  config_util.add_trainer_arguments(parser)
  parser.epilog += (" E.g. --config.data.source=folder "
                    "--config.data.path=maps/")


def run(args) -> int:
  from efiqa_jax import commands  # pylint: disable=g-import-not-at-top
  from efiqa_jax import config_util  # pylint: disable=g-import-not-at-top
  from efiqa_jax import runtime  # pylint: disable=g-import-not-at-top
  from efiqa_jax.teacher import train  # pylint: disable=g-import-not-at-top
  config = config_util.config_from_args(args)
  res, code = commands.run_training(
      NAME, lambda: train.train_and_evaluate(config, args.workdir))
  if code is not None:
    return code
  if runtime.is_primary():
    print(f"trained {res.step}/{res.total_steps} steps; final loss "
          f"{res.final_loss:.5g}; model exported to {res.export_dir}")
  return runtime.EXIT_OK
