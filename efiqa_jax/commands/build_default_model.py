"""efiqa build-default-model: the recorded recipe of the bundled model."""
NAME = "build-default-model"
HELP = ("Train, calibrate (on synthetic data) and write the bundled default "
        "teacher; resumes in --workdir.")


def add_arguments(p):
  p.add_argument("--config", default="configs/teacher_default.py")
  p.add_argument("--workdir", required=True)
  p.add_argument("--out", required=True,
                 help="e.g. efiqa_jax/assets/teacher_default")
  p.add_argument("--calib-n", type=int, default=96,
                 help="synthetic images used for calibration")
  p.add_argument("overrides", nargs="*", help="--config.key=value ...")


def run(args) -> int:
  from efiqa_jax import default_model  # pylint: disable=g-import-not-at-top
  meta = default_model.build_default_model(
      args.config, args.workdir, args.out, overrides=args.overrides,
      calib_n=args.calib_n)
  print(f"wrote {args.out}: threshold {meta['anomaly_threshold']}, grading "
        f"{meta['grading']}, map AUROC "
        f"{meta['calibration']['map_auroc']:.3f}")
  return 0
