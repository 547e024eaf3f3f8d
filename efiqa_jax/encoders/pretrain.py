"""Self-supervised pretraining of a small ViT encoder (masked image modelling).

EFIQA's student stands on a frozen foundation model (DINOv3). Where no
pretrained weights can be had (offline machines, tests, the synthetic
experiment in experiments/distill_synthetic.py), this trains a stand-in, label-free:
SimMIM-style masked image modelling on photographs.

  * input: FOV crops with the student's exact chain (`efiqa extract`'s
    `features.PrepareEncoderInput`: crop at work_size -> bicubic to `size` ->
    ImageNet mean/std), random horizontal / vertical flips;
  * a random `mask_ratio` share of the patches of each image is blanked
    (pixels set to 0 in normalised space, i.e. the ImageNet mean colour);
  * the encoder (`efiqa_jax.models.vit.VisionTransformer`) sees the blanked
    image; a linear decoder maps each patch token to the patch's pixels;
  * loss: MSE on the masked patches only, against per-patch normalised pixels
    (MAE's `norm_pix_loss`).
Nothing but photographs is read: no labels, no degradation masks.

The step is one jax.jit over a device mesh (batch split over 'data' with
`NamedSharding`, parameters replicated), AdamW with linear warm-up and cosine
decay. Batch s is a function of (seed, s). The encoder alone is written with
`checkpoints.save_model`, so `efiqa extract / distill --encoder DIR` load it.
No mid-run checkpoints: runs are minutes long; a killed run starts again.
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
  from efiqa_jax import features, sources  # pylint: disable=g-import-not-at-top
  if isinstance(inputs, str):
    inputs = [inputs]
  paths = sources.list_inputs(list(inputs))
  prep = features.PrepareEncoderInput(size, work_size=work_size)
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
                 progress: bool = True) -> PretrainResult:
  """Pretrains `config.encoder` on `inputs` and saves it to `out_dir`."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from efiqa_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from efiqa_jax import sharding as sh  # pylint: disable=g-import-not-at-top

  t0 = time.time()
  size, work = int(config.size), int(config.work_size)
  pixels, ok_paths, failed = load_pixels(inputs, size, work, progress)
  for p, msg in failed:
    print(f"pretrain-encoder: left out {p}: {msg}", file=sys.stderr)
  enc = build_encoder(config)
  p = enc.cfg["patch_size"]
  if size % p:
    raise ValueError(f"size {size} is not a multiple of patch {p}")
  gh = gw = size // p
  d = enc.cfg["hidden_size"]
  c = enc.cfg["in_channels"]
  dec = nnx.Linear(d, p * p * c, rngs=nnx.Rngs(int(config.seed) + 1))
  model = nnx.Dict({"encoder": enc, "decoder": dec})
  graphdef, params = nnx.split(model, nnx.Param)

  mesh = sh.make_mesh([tuple(a) for a in config.mesh])
  dsh, rep = sh.data_sharding(mesh), sh.replicated(mesh)
  bsz, steps = int(config.batch_size), int(config.steps)
  if bsz % sh.batch_shards(dsh):
    raise ValueError(f"batch_size {bsz} is not divisible by the "
                     f"{sh.batch_shards(dsh)} data shards")
  params = jax.device_put(nnx.to_pure_dict(params), rep)
  oc = config.optimizer
  warm = min(int(oc.warmup_steps), max(steps - 1, 1))
  sched = optax.warmup_cosine_decay_schedule(0.0, oc.lr, warm, max(steps, 2),
                                             oc.lr * oc.final_lr_fraction)
  tx = optax.adamw(sched, b1=oc.b1, b2=oc.b2, weight_decay=oc.weight_decay)
  opt_state = jax.jit(tx.init, out_shardings=rep)(params)
  key0 = jax.random.key(int(config.seed))
  ratio = float(config.mask_ratio)

  def step_fn(params, opt_state, x, step):
    mask = random_patch_mask(jax.random.fold_in(key0, step), x.shape[0], gh,
                             gw, ratio)

    def loss_fn(pr):
      m = nnx.merge(graphdef, pr)
      return mim_loss(m["encoder"], m["decoder"], x, mask, p)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    upd, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, upd), opt_state, loss

  jstep = jax.jit(step_fn, donate_argnums=(0, 1),
                  out_shardings=(rep, rep, rep))
  losses = []
  log_every = max(1, int(config.log_every))
  bar = None
  if progress:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=steps, desc="pretrain-encoder", unit="step",
               file=sys.stderr)
  flip = bool(config.flip)
  with jax.set_mesh(mesh):
    for s in range(steps):
      # Every process draws the same global batch and feeds its own rows.
      x = host_batch(pixels, bsz, int(config.seed), s, flip)
      xb = sh.global_from_full({"x": x}, dsh)["x"]
      params, opt_state, loss = jstep(params, opt_state, xb, jnp.int32(s))
      if (s + 1) % log_every == 0 or s == 0 or s == steps - 1:
        lv = float(loss)
        if not np.isfinite(lv):
          raise FloatingPointError(f"pretrain-encoder: loss {lv} at step {s}")
        losses.append((s + 1, lv))
        if bar is not None:
          bar.set_postfix(loss=f"{lv:.4f}")
      if bar is not None:
        bar.update(1)
  if bar is not None:
    bar.close()
  host = jax.tree.map(lambda a: np.asarray(jax.device_get(a)), params)
  trained = nnx.merge(graphdef, host)
  meta = {"pretraining": {
      "method": "masked image modelling (SimMIM-style, norm_pix_loss)",
      "config": json.loads(json.dumps(config.to_dict(), default=str)),
      "images": len(ok_paths), "left_out": [list(f) for f in failed],
      "steps": steps, "first_loss": losses[0][1], "final_loss": losses[-1][1],
      "preprocessing": {"size": size, "work_size": work, "mode": "efiqa"}}}
  os.makedirs(out_dir, exist_ok=True)
  checkpoints.save_model(out_dir, trained["encoder"], meta, overwrite=True)
  if sh.is_primary():  # one writer (save_model has synchronised the rest)
    with open(os.path.join(out_dir, "pretrain_loss.json"), "w") as f:
      json.dump(losses, f)
  return PretrainResult(os.path.abspath(out_dir), steps, losses[-1][1],
                        losses[0][1], len(ok_paths), failed,
                        time.time() - t0)


def default_encoder_kwargs() -> dict[str, Any]:
  """A DINOv3-like tiny ViT (RoPE, 4 registers, LayerScale, q/v bias)."""
  return dict(patch_size=16, hidden_size=64, depth=4, num_heads=4,
              mlp_hidden=256, num_registers=4, layerscale=True,
              qkv_bias="qv", ln_eps=1e-5, pos="rope", rope_base=100.0)
