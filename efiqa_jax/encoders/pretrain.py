"""Self-supervised pretraining of a small ViT encoder (masked image modelling).

EFIQA's student stands on a frozen foundation model (DINOv3). Where no
pretrained weights can be had (offline machines, tests, the synthetic
experiment in experiments/distill_synthetic.py), this trains a stand-in, label-free:
SimMIM-style masked image modelling on photographs.

  * input: FOV crops with the student's exact chain (`efiqa extract`'s
    `encoders.extract.PrepareEncoderInput`: crop at work_size -> bicubic to `size` ->
    ImageNet mean/std), random horizontal / vertical flips;
  * a random `mask_ratio` share of the patches of each image is blanked
    (pixels set to 0 in normalised space, i.e. the ImageNet mean colour);
  * the encoder (`efiqa_jax.models.vit.VisionTransformer`) sees the blanked
    image; a linear decoder maps each patch token to the patch's pixels;
  * loss: MSE on the masked patches only, against per-patch normalised pixels
    (MAE's `norm_pix_loss`).
Nothing but photographs is read: no labels, no degradation masks.

A task on `efiqa_jax.trainer` (mesh and parameter sharding from
`config.mesh` / `config.sharding.params`, AdamW with the warm-up + cosine
schedule of `config.schedule`), with checkpoints, metrics and the run
fingerprint in OUT/train: a stopped run resumes where it was. Batch s is a
function of (seed, s). The encoder alone is written with
`checkpoints.save_model`, so `efiqa extract / distill --encoder DIR` load it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any, Sequence

import numpy as np


@dataclasses.dataclass
class PretrainResult:
  out_dir: str
  steps: int
  final_loss: float
  first_loss: float
  n_images: int
  failed: list            # [(path, status message)] photographs left out
  seconds: float


def patchify(x, p: int):
  """(B, H, W, C) -> (B, H/p, W/p, p*p*C), row-major within a patch."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // p, p, w // p, p, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h // p, w // p, p * p * c)


def random_patch_mask(key, batch: int, gh: int, gw: int, ratio: float):
  """(B, gh, gw) float32, exactly round(ratio * gh * gw) ones per image."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  n = gh * gw
  k = int(round(ratio * n))
  if not 0 < k < n:
    raise ValueError(f"mask_ratio {ratio} masks {k} of {n} patches; need "
                     "at least one masked and one visible patch")
  u = jax.random.uniform(key, (batch, n))
  rank = jnp.argsort(jnp.argsort(u, axis=1), axis=1)
  return (rank < k).astype(jnp.float32).reshape(batch, gh, gw)


def mim_loss(encoder, decoder, x, mask, patch: int, eps: float = 1e-6):
  """Masked-patch MSE of the decoder's pixels vs per-patch normalised x."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  m_pix = jnp.repeat(jnp.repeat(mask, patch, axis=1), patch, axis=2)
  z = encoder.patch_features(x * (1.0 - m_pix[..., None]))
  pred = decoder(z.astype(jnp.float32))
  tgt = patchify(x, patch)
  mu = tgt.mean(-1, keepdims=True)
  var = tgt.var(-1, keepdims=True)
  tgt = (tgt - mu) / jnp.sqrt(var + eps)
  per_patch = jnp.mean((pred - tgt) ** 2, axis=-1)
  return jnp.sum(per_patch * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def load_pixels(inputs: Sequence[str] | str, size: int, work_size: int,
                progress: bool = False):
  """Photographs -> ((N, size, size, 3) float32 encoder inputs, ok paths,
  [(path, 'status: message')] of those that could not be prepared)."""
  from efiqa_jax import sources  # pylint: disable=g-import-not-at-top
  from efiqa_jax.encoders import extract  # pylint: disable=g-import-not-at-top
  if isinstance(inputs, str):
    inputs = [inputs]
  paths = sources.list_inputs(list(inputs))
  prep = extract.PrepareEncoderInput(size, work_size=work_size)
  xs, ok, failed = [], [], []
  it = paths
  if progress:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    it = tqdm(paths, desc="pretrain: prepare", unit="img", file=sys.stderr)
  for p in it:
    row = prep.map({"path": p})
    if bool(row["ok"]):
      xs.append(row["pixels"])
      ok.append(p)
    else:
      failed.append((p, f"{row['status']}: {row['message']}"))
  if not xs:
    raise ValueError(f"no photograph could be prepared from {list(inputs)}"
                     + (f" (first failure: {failed[0]})" if failed else ""))
  return np.stack(xs).astype(np.float32), ok, failed


def host_batch(pixels: np.ndarray, batch: int, seed: int, step: int,
               flip: bool = True) -> np.ndarray:
  """Batch `step`: images drawn with replacement, flipped, from (seed, step)."""
  rng = np.random.default_rng([int(seed), int(step)])
  idx = rng.integers(len(pixels), size=batch)
  x = pixels[idx]
  if flip:
    fh = rng.random(batch) < 0.5
    fv = rng.random(batch) < 0.5
    x = np.where(fh[:, None, None, None], x[:, :, ::-1], x)
    x = np.where(fv[:, None, None, None], x[:, ::-1], x)
  return np.ascontiguousarray(x)


def build_encoder(config):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from efiqa_jax.models import vit  # pylint: disable=g-import-not-at-top
  return vit.VisionTransformer(**dict(config.encoder),
                               rngs=nnx.Rngs(int(config.seed)))


def pretrain_mim(inputs: Sequence[str] | str, out_dir: str, config, *,
                 progress: bool = True,
                 workdir: str | None = None) -> PretrainResult:
  """Pretrains `config.encoder` on `inputs` and saves it to `out_dir`.

  A task on `efiqa_jax.trainer`: checkpoints, metrics and the run
  fingerprint live in `workdir` (default OUT_DIR/train); the same call
  resumes there. Raises `runtime.Interrupted` when stopped by SIGTERM /
  Ctrl-C (after a checkpoint).
  """
  import hashlib  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from efiqa_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from efiqa_jax import files  # pylint: disable=g-import-not-at-top
  from efiqa_jax import metric_writers  # pylint: disable=g-import-not-at-top
  from efiqa_jax import runtime  # pylint: disable=g-import-not-at-top
  from efiqa_jax import trainer  # pylint: disable=g-import-not-at-top

  t0 = time.time()
  runtime.initialize()
  workdir = files.output_dir(workdir or files.join(out_dir, "train"))
  size, work = int(config.size), int(config.work_size)
  pixels, ok_paths, failed = load_pixels(
      inputs, size, work, progress and runtime.is_primary())
  if runtime.is_primary():
    for p, msg in failed:
      print(f"pretrain-encoder: left out {p}: {msg}", file=sys.stderr)
  abstract = nnx.eval_shape(lambda: build_encoder(config))
  p = abstract.cfg["patch_size"]
  if size % p:
    raise ValueError(f"size {size} is not a multiple of patch {p}")
  gh = gw = size // p
  d = abstract.cfg["hidden_size"]
  c = abstract.cfg["in_channels"]
  ratio = float(config.mask_ratio)
  random_patch_mask(jax.random.key(0), 1, gh, gw, ratio)  # checks the ratio

  def build():
    return nnx.Dict({"encoder": build_encoder(config),
                     "decoder": nnx.Linear(d, p * p * c,
                                           rngs=nnx.Rngs(int(config.seed) + 1))})

  def loss(model, batch, rng, step):
    del step
    x = batch["x"]
    mask = random_patch_mask(rng, x.shape[0], gh, gw, ratio)
    return mim_loss(model["encoder"], model["decoder"], x, mask, p), {}

  bsz, steps = int(config.batch_size), int(config.steps)
  pc, pi = jax.process_count(), jax.process_index()
  if bsz % pc:
    raise ValueError(f"batch_size {bsz} is not divisible by the {pc} "
                     "processes")
  lo, hi = bsz * pi // pc, bsz * (pi + 1) // pc
  flip = bool(config.flip)

  def batches():
    import grain  # pylint: disable=g-import-not-at-top
    # Every process draws the same global batch (a function of the step)
    # and keeps its contiguous share of rows.
    ds = grain.MapDataset.range(steps).map(lambda s: {"x": host_batch(
        pixels, bsz, int(config.seed), s, flip)[lo:hi]})
    return iter(ds.to_iter_dataset(grain.ReadOptions(
        num_threads=2, prefetch_buffer_size=4)))

  def export(model, res):
    curve = [(int(r["step"]), float(r["loss"]))
             for r in metric_writers.read_metrics(workdir) if "loss" in r]
    meta = {"pretraining": {
        "method": "masked image modelling (SimMIM-style, norm_pix_loss)",
        "config": json.loads(json.dumps(config.to_dict(), default=str)),
        "images": len(ok_paths), "left_out": [list(f) for f in failed],
        "steps": steps, "first_loss": curve[0][1] if curve else None,
        "final_loss": res.final_loss,
        "preprocessing": {"size": size, "work_size": work, "mode": "efiqa"}}}
    files.makedirs(out_dir)
    checkpoints.save_model(out_dir, model["encoder"], meta, overwrite=True)
    if runtime.is_primary():  # one writer (save_model synchronised the rest)
      files.atomic_write_text(files.join(out_dir, "pretrain_loss.json"),
                              json.dumps(curve))
    return curve

  oc = config.optimizer
  sched = trainer.schedule_config(config)
  tc = trainer.TrainConfig(
      total_steps=steps, seed=int(config.seed), lr=float(oc.lr),
      b1=float(oc.b1), b2=float(oc.b2), eps=float(oc.get("eps", 1e-8)),
      weight_decay=float(oc.weight_decay),
      grad_clip_norm=float(oc.get("grad_clip_norm", 0.0) or 0.0),
      schedule=sched, mesh=config.mesh, rules=list(config.sharding.params),
      checkpoint_every=int(config.checkpoint_every),
      keep_checkpoints=int(config.get("keep_checkpoints", 2)),
      log_every=max(1, int(config.log_every)), progress=progress,
      profile_steps=str(config.get("profile_steps", "") or ""),
      max_steps=int(config.get("max_steps", -1)))
  names = hashlib.sha256("\n".join(sorted(
      os.path.basename(q) for q in ok_paths)).encode()).hexdigest()[:16]
  task = trainer.Task(
      name="pretrain-encoder", build=build, loss=loss, batches=batches,
      global_batch=bsz, device_keys=["x"], export=export,
      fingerprint=trainer.config_fingerprint(
          config, dict(images=len(ok_paths), image_names_sha=names)),
      jit_key=json.dumps(dict(encoder=config.encoder.to_dict(), seed=int(
          config.seed), size=size, mask_ratio=ratio), sort_keys=True,
                         default=str))
  res = trainer.fit(task, tc, workdir)
  curve = res.export or [(res.step, res.final_loss)]
  return PretrainResult(os.fspath(files.abs_path(out_dir)), res.step,
                        res.final_loss,
                        curve[0][1], len(ok_paths), failed, time.time() - t0)


def default_encoder_kwargs() -> dict[str, Any]:
  """A DINOv3-like tiny ViT (RoPE, 4 registers, LayerScale, q/v bias)."""
  return dict(patch_size=16, hidden_size=64, depth=4, num_heads=4,
              mlp_hidden=256, num_registers=4, layerscale=True,
              qkv_bias="qv", ln_eps=1e-5, pos="rope", rope_base=100.0)
