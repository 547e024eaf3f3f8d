"""Self-supervised pretraining of a small ViT encoder (masked image modelling).

EFIQA's student stands on a frozen foundation model (DINOv3). Where no
pretrained weights can be had (offline machines, tests, the synthetic
experiment in experiments/distill_synthetic.py), this trains a stand-in, label-free:
SimMIM-style masked image modelling on photographs.

  * input: FOV crops with the student's exact chain (`efiqa extract`'s
    `encoders.extract.PrepareEncoderInput`: crop at work_size -> bicubic to `size` ->
    ImageNet mean/std), random horizontal / vertical flips; from
    photographs or the records of a prepared folder (`efiqa prepare --size
    work_size`: the same crops, not decoded again), streamed through
    `input_pipeline.training_batches` (`student.data.encoder_batches`):
    each process reads only its rows of every global batch, epochs
    reshuffled, the iterator state in the checkpoint;
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
fingerprint in OUT/train: a stopped run resumes where it was. The encoder alone is written with
`checkpoints.save_model`, so `efiqa extract / distill --encoder DIR` load it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any, Sequence



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
  from efiqa_jax.student import data as data_lib  # pylint: disable=g-import-not-at-top
  # Only ids and paths are held: photographs are checked once here, a
  # prepared folder's manifest says which records are ok.
  found = data_lib.encoder_inputs(
      inputs, size=size, work_size=work, preprocess="fov",
      progress=progress and runtime.is_primary())
  ok = sorted(found.by_id.values())  # input order
  if not ok:
    raise ValueError(f"no photograph could be prepared from {inputs}"
                     + (f" (first failure: {found.failed[0]})"
                        if found.failed else ""))
  ok_paths = [found.paths[i] for i in ok]
  failed = found.failed
  if runtime.is_primary():
    for q, msg in failed:
      print(f"pretrain-encoder: left out {q}: {msg}", file=sys.stderr)
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
    x = batch["pixels"]
    mask = random_patch_mask(rng, x.shape[0], gh, gw, ratio)
    return mim_loss(model["encoder"], model["decoder"], x, mask, p), {}

  bsz, steps = int(config.batch_size), int(config.steps)
  # Whole reshuffled epochs, enough of them for `steps` global batches.
  epochs = -(-steps * bsz // len(ok))
  flip = bool(config.flip)
  source = data_lib.Labelled(found.source, ok)
  rows = data_lib.EncoderRows(size, work, "fov")

  def batches():
    return iter(data_lib.encoder_batches(
        source, rows, seed=int(config.seed), global_batch=bsz,
        num_epochs=epochs, flip=flip, flip_vertical=flip,
        num_workers=int(config.get("data_workers", 0) or 0),
        read_threads=max(1, int(config.get("data_threads", 2)))))

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
      global_batch=bsz, device_keys=["pixels"], export=export,
      fingerprint=trainer.config_fingerprint(
          config, dict(images=len(ok_paths), image_names_sha=names,
                       prepared=found.fingerprint)),
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
