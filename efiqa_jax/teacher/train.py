"""VUAD teacher training (EFIQA stage 1): `train_and_evaluate(config, workdir)`.

A task on `efiqa_jax.trainer`: the host feeds uint8 vessel maps (augmented
per record, see `data.py`; a checkpointed grain iterator; streamed from a
prepared folder or a tfds: build, held in RAM otherwise), the device
converts them to [0,1] 3-channel maps, draws the progressive grid mask from
the step's key (fold_in(seed key, step)), runs the residual U-Net on the
masked map and minimises the MSE to the unmasked map with AdamW.

The trainer owns the rest: the mesh and parameter sharding
(`config.mesh`, `config.sharding.params`), learning-rate schedule
(`config.schedule`), async orbax checkpoints in WORKDIR/checkpoints (state,
grain iterator, run fingerprint), metrics and panels, preemption. Calling
`train_and_evaluate` again with the same config resumes from the latest
checkpoint and reproduces the uninterrupted run bit for bit; a changed
config is refused. At the end the model is exported with
`efiqa_jax.checkpoints.save_model` to WORKDIR/export.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from efiqa_jax import files
from efiqa_jax import runtime
from efiqa_jax import trainer
from efiqa_jax.teacher import augment as aug_lib
from efiqa_jax.teacher import data as data_lib
from efiqa_jax.teacher import inference
from efiqa_jax.teacher import masking

ARCHITECTURE = "unet_res"


NonFiniteLossError = trainer.NonFiniteLossError


# ------------------------------------------------------------------ model


def model_kwargs(config) -> dict:
  return dict(in_channels=int(config.model.in_channels),
               out_channels=int(config.model.out_channels),
               base_channels=int(config.model.base_channels), residual=True,
               dtype=jnp.dtype(config.model.dtype))


def build_model(config, rngs: nnx.Rngs):
  from efiqa_jax.models.unet import UNet  # pylint: disable=g-import-not-at-top
  return UNet(**model_kwargs(config), rngs=rngs)


# ------------------------------------------------------------- the step


def to_input(vmap_u8: jax.Array, channels: int) -> jax.Array:
  """(B,H,W) uint8 -> (B,H,W,C) float32 in [0,1] (ToTensor on a gray->RGB map)."""
  x = vmap_u8.astype(jnp.float32) / 255.0
  return jnp.broadcast_to(x[..., None], x.shape + (channels,))


def _mask_batch(key, x, min_ratio, mcfg):
  return masking.apply_grid_mask(key, x, min_ratio=min_ratio,
                                 max_ratio=mcfg["max_ratio"],
                                 k_min=mcfg["k_min"], k_max=mcfg["k_max"])


def loss_fn(model, batch, rng, step, *, mcfg, channels):
  """MSE of the model's inpainting of a masked map to the unmasked map.

  The mask is drawn on the device from the step's key; `min_ratio` comes
  from the host (the epoch's masking schedule)."""
  del step
  x = to_input(batch["vmap"], channels)
  xm, info = _mask_batch(rng, x, batch["min_ratio"], mcfg)
  y = model(xm)
  loss = jnp.mean(jnp.square(y.astype(jnp.float32) - x))
  return loss, dict(mask_ratio=1.0 - jnp.mean(info["keep"]),
                    gamma=jnp.mean(info["gamma"]),
                    grid_k=jnp.mean(info["k"].astype(jnp.float32)))


def panel_fn(model, batch, rng, step, *, mcfg, channels):
  """Masked input, output, target, |f(x)| (scaled to its max) of the
  shown maps under a mask drawn from the step's key."""
  del step
  x = to_input(batch["vmap"], channels)
  xm, _ = _mask_batch(rng, x, batch["min_ratio"], mcfg)
  f = inference.residual(model, xm).astype(jnp.float32)
  a = inference.anomaly_of_residual(f)[..., None]
  return dict(masked=jnp.clip(xm, 0, 1), output=jnp.clip(xm + f, 0, 1),
              target=x, anomaly=a / jnp.maximum(jnp.max(a), 1e-6))


# ------------------------------------------------------------ utilities


@dataclasses.dataclass
class TrainResult:
  workdir: str
  step: int
  total_steps: int
  history: list  # [(step, mean loss over the logging window)]
  params: Any  # host copy (numpy leaves) of the final params state
  graphdef: Any
  export_dir: str | None
  data_description: dict
  # The last logged loss, also when a rerun of a finished run trains nothing.
  final_loss: float = float("nan")


def _schedule_values(config, epoch: int) -> tuple[float, float]:
  m = config.mask
  min_ratio = masking.min_ratio_schedule(
      epoch, init_min=m.init_min_ratio, final_min=m.final_min_ratio,
      transition_start=m.transition_start, transition_end=m.transition_end)
  fov_p = aug_lib.fov_probability(epoch, p_max=config.augment.fov_p_max,
                                  start=config.augment.fov_start,
                                  end=config.augment.fov_end)
  return float(min_ratio), float(fov_p)


def _aug_config(config) -> aug_lib.AugmentConfig:
  a = config.augment
  return aug_lib.AugmentConfig(
      out_size=int(config.image_size), hflip=bool(a.hflip),
      vflip=bool(a.vflip), rotation=bool(a.rotation),
      fov_ratio_range=tuple(float(v) for v in a.fov_ratio_range),
      fov_min_diameter_px=float(a.fov_min_diameter_px))


def _check_config(config):
  if config.image_size % 16:
    raise ValueError(f"image_size must be a multiple of 16 (U-Net with 4 "
                     f"poolings), got {config.image_size}")
  if not 1 <= config.mask.k_min <= config.mask.k_max:
    raise ValueError(f"need 1 <= mask.k_min <= mask.k_max, got "
                     f"{config.mask.k_min}, {config.mask.k_max}")
  if config.model.in_channels != config.model.out_channels:
    raise ValueError("the residual U-Net needs in_channels == out_channels")


def train_config(config, total_steps: int) -> trainer.TrainConfig:
  """The trainer's settings from a teacher config."""
  return trainer.TrainConfig(
      total_steps=total_steps, seed=int(config.seed), lr=float(config.lr),
      b1=float(config.b1), b2=float(config.b2), eps=float(config.eps),
      weight_decay=float(config.weight_decay),
      grad_clip_norm=float(config.grad_clip_norm or 0.0),
      schedule=trainer.schedule_config(config),
      mesh=config.mesh, rules=list(config.sharding.params),
      checkpoint_every=int(config.checkpoint_every),
      keep_checkpoints=int(config.keep_checkpoints),
      log_every=int(config.log_every), image_every=int(config.image_every),
      num_panel_images=int(config.num_panel_images),
      progress=bool(config.progress_bar),
      profile_steps=str(config.get("profile_steps", "") or ""),
      max_steps=int(config.get("max_steps", -1)))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       _stop_after_steps: int | None = None) -> TrainResult:
  """Trains (or resumes) a VUAD teacher in `workdir`; exports it at the end.

  `_stop_after_steps` (tests only) returns abruptly after that many steps of
  THIS call, without the final checkpoint or export, like a killed job.
  Raises `runtime.Interrupted` when stopped by SIGTERM / Ctrl-C (after a
  checkpoint), `NonFiniteLossError` on a NaN/Inf loss, ValueError on a bad
  config or a workdir holding a run with other settings.
  """
  _check_config(config)
  runtime.initialize()
  workdir = files.output_dir(workdir)
  pi, pc = jax.process_index(), jax.process_count()

  gbs = int(config.batch_size)
  fov_kw = dict(fov_p_max=config.augment.fov_p_max,
                fov_start=config.augment.fov_start,
                fov_end=config.augment.fov_end)
  # Streamed (a prepared folder or tfds:): each process reads its share of
  # the records through grain.
  streamed = data_lib.streamed_maps(config.data)
  if streamed is not None:
    n, desc = streamed.n, streamed.desc
  else:
    maps, diam, desc = data_lib.load_vessel_maps(
        config.data, cache_dir=files.join(workdir, "data"))
    n = len(maps)
  total_steps = int(config.num_epochs) * n // gbs
  if total_steps < 1:
    raise ValueError(f"{n} maps x {config.num_epochs} epochs is less than one "
                     f"batch of {gbs}")
  if streamed is not None:
    num_workers = int(config.data.get("num_workers", 0) or 0)

    def batches():
      return iter(streamed.batches(
          seed=int(config.seed), global_batch=gbs,
          num_epochs=int(config.num_epochs), aug_cfg=_aug_config(config),
          num_workers=num_workers,
          read_threads=max(1, int(config.data.num_threads)),
          prefetch_batches=int(config.data.prefetch), **fov_kw))
  else:
    records = data_lib.TrainRecords(
        maps, diam, seed=config.seed, global_batch=gbs, process_index=pi,
        process_count=pc, aug_cfg=_aug_config(config), **fov_kw)

    def batches():
      return data_lib.make_train_iterator(
          records, total_steps, num_threads=config.data.num_threads,
          prefetch=config.data.prefetch)
  mcfg = dict(k_min=int(config.mask.k_min), k_max=int(config.mask.k_max),
              max_ratio=float(config.mask.max_ratio))
  channels = int(config.model.in_channels)

  def epoch_of(step: int) -> int:
    return step * gbs // n

  def step_inputs(step: int) -> dict:
    return {"min_ratio": np.float32(_schedule_values(config,
                                                     epoch_of(step))[0])}

  def host_metrics(host, step: int) -> dict:
    e = epoch_of(step)
    min_ratio, fov_p = _schedule_values(config, e)
    return dict(fov_crop=float(np.mean(host["fov_crop"])),
                min_ratio=min_ratio, fov_p=fov_p, epoch=float(e))

  def export(model, res: trainer.FitResult) -> str:
    return export_model(config, workdir, model, desc, res.step,
                        res.total_steps, res.history or [
                            (res.step, res.final_loss)])

  kw = model_kwargs(config)
  task = trainer.Task(
      name="train-teacher",
      build=lambda: build_model(config, nnx.Rngs(config.seed)),
      loss=functools.partial(loss_fn, mcfg=mcfg, channels=channels),
      batches=batches,
      global_batch=gbs,
      device_keys=["vmap"],
      step_inputs=step_inputs,
      host_metrics=host_metrics,
      panels=functools.partial(panel_fn, mcfg=mcfg, channels=channels),
      export=export,
      fingerprint=trainer.config_fingerprint(config, dict(
          data_key=desc.get("data_key"), num_maps=n)),
      jit_key=(ARCHITECTURE, tuple(sorted((k, str(v)) for k, v in kw.items())),
               int(config.seed), tuple(sorted(mcfg.items())), channels))
  res = trainer.fit(task, train_config(config, total_steps), workdir,
                    _stop_after_steps=_stop_after_steps)
  return TrainResult(workdir, res.step, res.total_steps, res.history,
                     res.params, res.graphdef,
                     res.export if res.step >= total_steps else None, desc,
                     res.final_loss)


def export_model(config, workdir, model, desc, step, total_steps,
                 history) -> str:
  """Writes WORKDIR/export with the generic `save_model` + metadata."""
  from efiqa_jax import checkpoints  # pylint: disable=g-import-not-at-top
  meta = dict(
      task="vuad_teacher",
      variant=ARCHITECTURE,  # residual U-Net: output = x + f(x)
      image_size=int(config.image_size),
      input_convention=("vessel map float32 [0,1] (gray <= 50 set to 0), "
                        "replicated to 3 channels, NHWC"),
      anomaly="mean over channels of |f(x)| (model.anomaly)",
      training_data=desc,
      steps=int(step), total_steps=int(total_steps),
      epochs=float(step * config.batch_size / desc["num_maps"]),
      final_loss=float(history[-1][1]) if history else None,
      config=json.loads(config.to_json_best_effort()),
  )
  out = files.join(workdir, "export")
  checkpoints.save_model(out, model, meta, overwrite=True)
  return out
