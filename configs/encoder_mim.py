"""Self-supervised tiny ViT encoder (`efiqa pretrain-encoder`).

A stand-in for a foundation model where none can be downloaded: a
DINOv3-like ViT (patch 16, RoPE, 4 registers, LayerScale) trained label-free
by masked image modelling on photographs (efiqa_jax.encoders.pretrain).
Input chain = the student's (`efiqa extract`): FOV crop at 512, bicubic to
448, ImageNet mean/std, 32-px patches (14x14 tokens). Default: D = 64,
depth 4, 400 steps of 32 images
(minutes on 2 CPU cores).

`configs/encoder_mim.py:tiny`: a few steps at 64 px for tests.
`configs/encoder_mim.py:wide`: D 384, depth 1, 16-px patches at 512 px.
"""
import ml_collections

from efiqa_jax.encoders import pretrain as _pretrain

VARIANTS = ("", "tiny", "wide")


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.encoder = ml_collections.ConfigDict(_pretrain.default_encoder_kwargs())
  # 448 px in 32-px patches: a 14x14 token grid (the paper's) that still sees
  # the crop near its 512-px detail, where blur and noise live.
  c.encoder.patch_size = 32
  c.size = 448
  c.work_size = 512
  c.mask_ratio = 0.6
  c.batch_size = 32
  c.steps = 400
  c.flip = True
  c.data_threads = 2  # reader threads per process (or worker)
  c.data_workers = 0  # grain worker processes decoding photographs
  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.lr = 2e-3
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.weight_decay = 0.05
  # Linear warm-up, then cosine decay to end_fraction * lr.
  c.schedule = ml_collections.ConfigDict(
      dict(kind="cosine", warmup_steps=50, end_fraction=0.05))
  c.seed = 0
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))
  c.sharding = ml_collections.ConfigDict()
  c.sharding.params = [(".*", "replicate")]  # README "Sharding"
  c.log_every = 25
  c.checkpoint_every = 100  # checkpoints in OUT/train; a rerun resumes
  c.keep_checkpoints = 2
  c.max_steps = -1  # > 0: stop after this step (checkpoint saved)
  c.profile_steps = ""  # "A:B": jax.profiler trace of steps A+1..B
  if arg == "tiny":
    c.encoder.hidden_size = 16
    c.encoder.depth = 1
    c.encoder.num_heads = 2
    c.encoder.mlp_hidden = 32
    c.encoder.patch_size = 16
    c.size = 64
    c.work_size = 96
    c.batch_size = 8
    c.steps = 4
    c.schedule.warmup_steps = 1
    c.log_every = 1
    c.checkpoint_every = 2
  elif arg == "wide":
    # Full-resolution tokens: the 512 FOV crop in 16-px patches (32x32
    # tokens), 768 pixel values per token into D = 384, one block. Used
    # randomly initialised by experiments/distill_synthetic.py --no-pretrain: token
    # resolution, not pretraining, was what limited the tiny encoders there.
    c.encoder.hidden_size = 384
    c.encoder.depth = 1
    c.encoder.num_heads = 6
    c.encoder.mlp_hidden = 768
    c.encoder.patch_size = 16
    c.size = 512
  elif arg not in (None, ""):
    raise ValueError(f"unknown variant {arg!r} (known: tiny, wide)")
  return c


def check(c):
  """What pretrain-encoder needs and what the encoder it writes must offer
  `extract`/`assess` (whole patches, heads that divide the width)."""
  e = c.encoder
  if c.size % e.patch_size:
    raise ValueError(f"size {c.size} is not a multiple of "
                     f"encoder.patch_size {e.patch_size}")
  if e.hidden_size % e.num_heads:
    raise ValueError(f"encoder.hidden_size {e.hidden_size} is not divisible "
                     f"by encoder.num_heads {e.num_heads}")
  if not 0 < c.mask_ratio < 1:
    raise ValueError(f"mask_ratio {c.mask_ratio} must be in (0, 1)")
