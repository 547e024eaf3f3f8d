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
  c.data.source = "synthetic"  # 'synthetic' | 'folder' | 'prepared'
  # source='folder': folder, glob or CSV with `path` (a prepared folder is
  # streamed like source='prepared'; tfds:NAME[:SPLIT] streams a TFDS build's
  # photographs, segmented label-free as read); 'prepared': a folder written by
  # `efiqa prepare --size WORK --vessels`, streamed through grain.
  c.data.path = ""
  # synthetic: 'label_free' | 'ground_truth'; folder: 'precomputed' | 'label_free'.
  # 'label_free' segments the clean synthetic photographs with
  # efiqa_jax.vessels, i.e. the same segmenter `efiqa pseudo-label` applies at
  # inference, so the teacher learns that segmenter's idea of a good map.
  c.data.vessels = "label_free"
  c.data.load_size = 512  # maps are stored/augmented at this size, then resized
  # folder + label_free: FOV crop side the photographs are segmented at (the
  # crop `efiqa assess` makes; 0 = load_size) and which split of the folder
  # trains ('all', or 'train' / 'calibration' / 'heldout' of
  # teacher.data.assign_splits).
  c.data.work_size = 0
  c.data.split = "all"
  c.data.gray_threshold = 50  # reference: gray <= 50 set to 0
  # 8-connected specks of fewer pixels (at load_size) removed from every
  # training map and at inference (teacher/inference.py); 0: none (reference).
  c.data.min_component = 0
  # ... removed at inference only (assess, pseudo-label, calibration): the
  # teacher learned specks as normal, so where noise broke the vessels into
  # specks their removal leaves the gap it inpaints. 0: none (reference).
  c.data.inference_min_component = 0
  c.data.num_threads = 4
  c.data.prefetch = 8
  c.data.num_workers = 0  # prepared folders: grain worker processes
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

  # Learning rate: constant (the paper); kind cosine | linear decay to
  # end_fraction * lr; linear warm-up over warmup_steps.
  c.schedule = ml_collections.ConfigDict(
      dict(kind="constant", warmup_steps=0, end_fraction=0.0))

  # Device mesh (-1 = the remaining devices); the batch is split over data
  # and fsdp. README "Sharding" for the rule format.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))
  c.sharding = ml_collections.ConfigDict()
  # (regex, spec), re.fullmatch on 'conv1/conv_a/kernel' paths, first match
  # wins, every parameter must match; spec: 'replicate', 'fsdp',
  # 'fsdp(min_mb=N)' or a tuple literal like "(None, None, None, 'model')".
  # Optimizer moments follow their parameter. With mesh.fsdp > 1:
  # [(".*", "fsdp")].
  c.sharding.params = [(".*", "replicate")]

  c.log_every = 50
  c.image_every = 1000
  c.num_panel_images = 4
  c.checkpoint_every = 1000
  c.keep_checkpoints = 2
  c.progress_bar = True
  c.profile_steps = ""  # "A:B": jax.profiler trace of steps A+1..B
  c.max_steps = -1  # > 0: stop after this step (checkpoint saved; resumable)

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
