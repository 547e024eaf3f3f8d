"""efiqa build-default-model: the recorded recipe of the bundled model."""
NAME = "build-default-model"
HELP = ("Train, calibrate (on synthetic data) and write the bundled default "
        "teacher; resumes in --workdir.")


def add_arguments(p):
  from efiqa_jax import config_util  # pylint: disable=g-import-not-at-top
  config_util.add_config_arguments(p, "teacher_default")
  p.add_argument("--workdir", required=True,
                 help="training checkpoints (a rerun resumes)")
  p.add_argument("--out", required=True,
                 help="e.g. efiqa_jax/assets/teacher_default")
  p.add_argument("--calib-n", type=int, default=96,
                 help="synthetic images used for calibration")


def run(args) -> int:
  from efiqa_jax import default_model  # pylint: disable=g-import-not-at-top
  meta = default_model.build_default_model(
      args.config, args.workdir, args.out, overrides=list(args.overrides) + list(args.config_overrides),
      calib_n=args.calib_n)
  print(f"wrote {args.out}: threshold {meta['anomaly_threshold']}, grading "
        f"{meta['grading']}, map AUROC "
        f"{meta['calibration']['map_auroc']:.3f}")
  return 0
