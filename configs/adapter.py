"""EFIQA adapter distillation (`efiqa train-adapter --config configs/adapter.py`).

Paper defaults (efiqa-method.md §1.5): frozen DINOv3 ViT-L/16 at 224 (14x14
tokens, D = 1024), `sc_linear` adapter, class-balanced BCE with pos_weight 20
(the public config uses 9.58), AdamW lr 1e-3, batch 4096 patches, 20 epochs,
seed 504. Pseudo-labels must be on the same 14x14 grid
(`efiqa pseudo-label --grid 14`).

`configs/adapter.py:tiny`: a few steps on small batches for tests/smoke runs.
"""
import ml_collections

VARIANTS = ("", "tiny")
_ADAPTERS = ("linear", "sc_linear", "mlp", "modern_head_64to16", "sa_cnn",
             "cnn")  # efiqa_jax.models.adapters (tests check the list)


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.mode = "features"            # features | end_to_end
  c.features_dir = ""            # efiqa extract output (npy)
  c.labels_dir = ""              # efiqa pseudo-label output (labels/<id>.png)
  c.images = ""                  # end_to_end: photographs (folder/glob/CSV)
  #                                or a folder of `efiqa prepare --size
  #                                work_size` (streamed, not decoded again)
  c.encoder = ""                 # end_to_end: ViT encoder model directory
  c.encoder_dtype = "float32"    # end_to_end: float32 | bfloat16
  c.size = 224                   # end_to_end: encoder input side
  c.work_size = 512              # end_to_end: FOV crop side before resize
  # What the encoder sees: efiqa (the whole photograph, EFIQA's extractor) |
  # fov (the FOV crop at work_size). Unset: features mode takes the features'
  # metadata.json, end_to_end and `efiqa distill` use fov. The adapter
  # records it; `efiqa assess --model student` follows the record.
  c.preprocess = ml_collections.config_dict.placeholder(str)
  c.adapter = ml_collections.ConfigDict()
  c.adapter.name = "linear"      # linear (sc_linear) | mlp | modern_head_64to16
  c.adapter.kwargs = ml_collections.ConfigDict()
  c.batching = "patch"           # patch (pool all tokens) | image
  c.batch_size = 4096
  c.loss = ml_collections.ConfigDict()
  c.loss.name = "bce"            # bce | nnpu
  c.loss.pos_weight = 20.0       # paper; public config 9.58
  c.loss.pi = 0.05               # nnpu only
  c.loss.beta = 0.0              # nnpu only
  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.lr = 1e-3
  c.optimizer.b1 = 0.9           # torch AdamW defaults
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.01
  c.optimizer.grad_clip_norm = 0.0  # 0 = off
  # Learning rate: constant (the paper); cosine | linear decay to
  # end_fraction * lr; linear warm-up over warmup_steps.
  c.schedule = ml_collections.ConfigDict(
      dict(kind="constant", warmup_steps=0, end_fraction=0.0))
  c.epochs = 20
  c.seed = 504
  c.augment_flip = False         # image batching only
  c.label_resize = "error"       # label grid != output grid: error | nearest
  # Device mesh; the batch is split over data (and fsdp). end_to_end: a
  # large frozen encoder can be sharded over `model` by rules, e.g.
  # mesh.model=2 with ("encoder/.*mlp/fc1/kernel", "(None, 'model')") first.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))
  c.sharding = ml_collections.ConfigDict()
  # (regex, spec) on 'adapter/linear/kernel', 'encoder/blocks/0/...' paths
  # (re.fullmatch, first match wins, every parameter must match).
  c.sharding.params = [(".*", "replicate")]
  c.checkpoint_every = 200       # steps
  c.keep_checkpoints = 2
  c.log_every = 20
  c.max_steps = -1               # > 0: stop there (checkpoint, no export)
  c.profile_steps = ""           # "A:B": jax.profiler trace of steps A+1..B
  c.data_threads = 2
  c.data_workers = 0             # end_to_end: grain worker processes
  # `efiqa distill`'s pseudo-labels: a pixel is anomalous when |f(x)| >
  # threshold, a cell positive when >= relax of it is. None: the teacher's
  # calibrated rule (`efiqa calibrate-teacher`), else the reference 0.02/0.9.
  c.pseudo_labels = ml_collections.ConfigDict()
  c.pseudo_labels.threshold = ml_collections.config_dict.placeholder(float)
  c.pseudo_labels.relax = ml_collections.config_dict.placeholder(float)
  c.progress = True
  if arg == "tiny":
    c.batch_size = 64
    c.epochs = 2
    c.checkpoint_every = 2
    c.log_every = 1
    c.progress = False
  elif arg not in (None, ""):
    raise ValueError(f"unknown variant {arg!r} (known: tiny)")
  return c


def check(c):
  """Choices train-adapter and distill accept (run after the overrides)."""
  for key, allowed in (("mode", ("features", "end_to_end")),
                       ("batching", ("patch", "image")),
                       ("loss.name", ("bce", "nnpu")),
                       ("label_resize", ("error", "nearest")),
                       ("adapter.name", _ADAPTERS)):
    v = c
    for k in key.split("."):
      v = v[k]
    if v not in allowed:
      raise ValueError(f"{key} {v!r} is not one of {', '.join(allowed)}")
  for key in ("size", "work_size", "batch_size", "epochs"):
    if c[key] <= 0:
      raise ValueError(f"{key} must be positive, got {c[key]}")
  if c.batching == "patch" and c.mode == "end_to_end":
    raise ValueError("mode 'end_to_end' trains on whole photographs: set "
                     "batching='image'")
  if c.batching == "patch" and c.adapter.name in ("modern_head_64to16",
                                                  "sa_cnn", "cnn"):
    raise ValueError(f"adapter {c.adapter.name!r} sees whole token grids: "
                     "set batching='image'")
