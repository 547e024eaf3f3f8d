"""The bundled default teacher (efiqa_jax/assets/teacher_default).

Built by the recorded command (README, "The default model"):
  efiqa build-default-model --config configs/teacher_default.py \
      --workdir runs/teacher_default --out efiqa_jax/assets/teacher_default
from data any machine regenerates: label-free vessel maps (efiqa_jax.vessels)
of clean synthetic photographs (efiqa_jax.synth). It differs from the paper's
teacher only where CPU-sized training needs it: a narrower U-Net (base 8,
0.49 M parameters, 2 MB) at 128x128 with batch 8, and the masking / FOV-crop
schedules compressed to the shorter run (same shape: [0.8, 1] widening to
[0, 1] between 20 % and 80 % of training). Everything else follows
configs/teacher.py (the paper's settings).

Expected: 2500 steps, ~10-30 min on 2 CPU cores; calibration reports a
synthetic map AUROC in the sidecar's `calibration`.
"""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "efiqa_config_teacher",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "teacher.py"))
_teacher = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_teacher)

VARIANTS = ("", "tiny")
check = _teacher.check


def get_config(arg=None):
  c = _teacher.get_config(None)
  c.seed = 36
  c.image_size = 128
  c.batch_size = 8
  c.num_epochs = 50
  c.model.base_channels = 8
  c.data.source = "synthetic"
  c.data.vessels = "label_free"
  c.data.load_size = 256
  c.data.synthetic.n = 400
  c.data.synthetic.seed = 100000
  c.data.synthetic.size = 512
  c.augment.fov_min_diameter_px = 112.0  # 224 px at 512, at load_size 256
  c.augment.fov_start, c.augment.fov_end = 10, 40
  c.mask.transition_start, c.mask.transition_end = 10, 40
  c.log_every = 50
  c.image_every = 500
  c.checkpoint_every = 250
  with c.unlocked():
    c.work_size = 512  # photograph crop size the default model assesses at
  if arg == "tiny":
    c.num_epochs = 2
    c.image_size = 64
    c.model.base_channels = 4
    c.data.synthetic.n = 16
    c.data.synthetic.size = 256
    c.data.load_size = 128
    c.augment.fov_min_diameter_px = 56.0
    c.augment.fov_start, c.augment.fov_end = 0, 1
    c.mask.transition_start, c.mask.transition_end = 0, 1
    c.data.num_threads = 0
    c.data.prefetch = 0
    c.log_every = 2
    c.image_every = 4
    c.checkpoint_every = 2
    c.work_size = 256
  elif arg not in (None, ""):
    raise ValueError(f"unknown variant {arg!r} (known: tiny)")
  return c
