"""VUAD teacher (EFIQA stage 1): masked inpainting of vessel maps.

Paper/reference defaults (EFIQA §1.3, `vuad_default.yaml`): residual U-Net
(base 64), 256x256, batch 16, AdamW lr 1e-3 (weight decay 0.01, the torch
default), 100 epochs, seed 36, grid K in [4, 32], masking ratio range
[0.8, 1] -> [0, 1] between epochs 20 and 80, RandomFOV p 0 -> 0.5 over the
same epochs, ratio range [0.5, 1], min diameter 224 px.

Run:
  efiqa train-teacher --config configs/teacher.py --workdir /tmp/vuad
  efiqa train-teacher --config configs/teacher.py:tiny --workdir /tmp/vuad_tiny
  efiqa train-teacher --config configs/teacher.py:b32 --workdir /tmp/vuad_b32
  efiqa train-teacher --config configs/teacher.py \
      --config.data.source=folder --config.data.path=/data/vessel_maps \
      --workdir /tmp/vuad_real
A killed run resumes from the workdir's latest checkpoint when restarted with
the same command.
"""
import ml_collections

VARIANTS = ("", "tiny", "b32")  # "" = the paper's settings


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.seed = 36
  c.num_epochs = 100
  c.batch_size = 16  # global
  c.image_size = 256
  c.lr = 1e-3
  c.weight_decay = 0.01
  c.b1, c.b2, c.eps = 0.9, 0.999, 1e-8  # torch AdamW defaults
  c.grad_clip_norm = 0.0  # 0 = off (the reference does not clip)

  c.model = ml_collections.ConfigDict()
  c.model.base_channels = 64
  c.model.in_channels = 3
  c.model.out_channels = 3
  c.model.dtype = "float32"

  c.data = ml_collections.ConfigDict()
  c.data.source = "synthetic"  # 'synthetic' | 'folder'
  c.data.path = ""  # for source='folder': folder, glob or CSV with `path`
  # synthetic: 'label_free' | 'ground_truth'; folder: 'precomputed' | 'label_free'.
  # 'label_free' segments the clean synthetic photographs with
  # efiqa_jax.vessels, i.e. the same segmenter `efiqa pseudo-label` applies at
  # inference, so the teacher learns that segmenter's idea of a good map.
  c.data.vessels = "label_free"
  c.data.load_size = 512  # maps are stored/augmented at this size, then resized
  c.data.gray_threshold = 50  # reference: gray <= 50 set to 0
  c.data.num_threads = 4
  c.data.prefetch = 8
  c.data.synthetic = ml_collections.ConfigDict()
  c.data.synthetic.n = 1000
  c.data.synthetic.seed = 100000
  c.data.synthetic.size = 512
  c.data.synthetic.blur_sigma = 1.0  # px at 512; scaled with size

  c.augment = ml_collections.ConfigDict()
  c.augment.hflip = True
  c.augment.vflip = True
  c.augment.rotation = True
  c.augment.fov_ratio_range = (0.5, 1.0)
  c.augment.fov_min_diameter_px = 224.0  # at the original image scale
  c.augment.fov_p_max = 0.5
  c.augment.fov_start = 20
  c.augment.fov_end = 80

  c.mask = ml_collections.ConfigDict()
  c.mask.k_min = 4
  c.mask.k_max = 32
  c.mask.init_min_ratio = 0.8
  c.mask.final_min_ratio = 0.0
  c.mask.max_ratio = 1.0
  c.mask.transition_start = 20
  c.mask.transition_end = 80

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # devices on the data axis (-1 = all)
  c.sharding = ml_collections.ConfigDict()
  # (regex over 'a/b/kernel' parameter paths, spec); first match wins.
  # spec: 'replicate' or a tuple literal of mesh axes per dim, e.g.
  # "(None, None, None, 'data')". Optimizer moments follow their parameter.
  c.sharding.params = [(".*", "replicate")]

  c.log_every = 50
  c.image_every = 1000
  c.num_panel_images = 4
  c.checkpoint_every = 1000
  c.keep_checkpoints = 2
  c.progress_bar = True

  if arg == "tiny":
    c.num_epochs = 4
    c.batch_size = 8
    c.image_size = 64  # the smallest side `check` allows
    c.model.base_channels = 4
    c.data.load_size = 64
    c.data.num_threads = 0
    c.data.prefetch = 0
    c.data.synthetic.n = 16
    c.data.synthetic.size = 256  # thin vessels survive the downsampling
    c.data.vessels = "ground_truth"  # no segmenter compile at tiny size
    c.augment.fov_min_diameter_px = 112.0  # 224 px at 512 scaled to 256
    c.augment.fov_start, c.augment.fov_end = 1, 3
    c.mask.transition_start, c.mask.transition_end = 1, 3
    c.log_every = 2
    c.image_every = 4
    c.checkpoint_every = 3
  elif arg == "b32":
    # The teacher of experiments/distill_synthetic.py's headline run (bench/README):
    # the paper's settings at base 32 (7.8 M parameters, 31 MB) and 80
    # epochs, the schedules at the paper's 20-80 % of training. 80 s on one
    # H200; ~2 h on 2 CPU cores. Then `efiqa calibrate-teacher`.
    c.model.base_channels = 32
    c.num_epochs = 80
    c.augment.fov_start, c.augment.fov_end = 16, 64
    c.mask.transition_start, c.mask.transition_end = 16, 64
    c.data.num_threads = 8
    c.log_every = 250
    c.image_every = 2500
    c.checkpoint_every = 1250
  elif arg not in (None, ""):
    raise ValueError(f"unknown variant {arg!r} (known: "
                     f"{', '.join(v for v in VARIANTS if v)})")
  return c


def check(c):
  """What the commands downstream of a teacher need; `config_util` runs it
  after the overrides, so a teacher that `assess` or `calibrate-teacher`
  would refuse is refused before training starts."""
  if c.image_size < 64 or c.image_size % 64:
    raise ValueError(
        f"image_size {c.image_size} must be a multiple of 64: assess, "
        "calibrate-teacher and pseudo-label pool the teacher's |f(x)| into "
        "a 64x64 map")
  if c.data.load_size < c.image_size:
    raise ValueError(f"data.load_size {c.data.load_size} is smaller than "
                     f"image_size {c.image_size}")
