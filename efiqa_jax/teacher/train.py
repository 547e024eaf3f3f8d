"""VUAD teacher training (EFIQA stage 1): `train_and_evaluate(config, workdir)`.

One jitted update step over a device mesh: the host feeds uint8 vessel maps
(augmented per record, see `data.py`), the device converts them to [0,1]
3-channel maps, draws the progressive grid mask (per-step key =
fold_in(seed key, step)), runs the residual U-Net on the masked map and
minimises the MSE to the unmasked map with AdamW.

Restart-safety: params, optimizer state, step and the grain iterator state are
saved together by an orbax CheckpointManager in WORKDIR/checkpoints; calling
`train_and_evaluate` again with the same config resumes from the latest one
and reproduces the uninterrupted run bit for bit (same data, same keys).
At the end the model is exported with `efiqa_jax.checkpoints.save_model` to
WORKDIR/export.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import json
import logging
import math
import os
import re
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from efiqa_jax import sharding as sharding_lib
from efiqa_jax.teacher import augment as aug_lib
from efiqa_jax.teacher import data as data_lib
from efiqa_jax.teacher import masking

ARCHITECTURE = "unet_res"


class NonFiniteLossError(FloatingPointError):
  pass


# ------------------------------------------------------------------ model


def model_kwargs(config) -> dict:
  return dict(in_channels=int(config.model.in_channels),
               out_channels=int(config.model.out_channels),
               base_channels=int(config.model.base_channels), residual=True,
               dtype=jnp.dtype(config.model.dtype))


def build_model(config, rngs: nnx.Rngs):
  from efiqa_jax.models.unet import UNet  # pylint: disable=g-import-not-at-top
  return UNet(**model_kwargs(config), rngs=rngs)


# ------------------------------------------------------------- sharding


def path_str(path) -> str:
  """'conv1/conv_a/kernel' from a jax key path (drops Variable `.value`)."""
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      if k.name != "value":
        parts.append(k.name)
  return "/".join(parts)


def parse_spec(spec: str) -> P:
  s = str(spec).strip()
  if s in ("", "replicate", "replicated", "()"):
    return P()
  try:
    val = ast.literal_eval(s)
  except (ValueError, SyntaxError):
    raise ValueError(f"bad sharding spec {spec!r}: use 'replicate' or a tuple "
                     "literal like \"(None, 'data')\"") from None
  if not isinstance(val, tuple):
    val = (val,)
  return P(*val)


def param_shardings(abstract_params, rules: Sequence[Sequence[str]], mesh):
  """NamedSharding per parameter from (regex, spec) rules; first match wins."""
  compiled = [(re.compile(r), parse_spec(s)) for r, s in rules]

  def one(path, leaf):
    name = path_str(path)
    for rx, spec in compiled:
      if rx.fullmatch(name):
        if len(spec) > len(leaf.shape):
          raise ValueError(f"sharding spec {spec} has more dims than "
                           f"parameter {name} {leaf.shape}")
        for dim, ax in zip(leaf.shape, spec):
          axes = () if ax is None else (ax if isinstance(ax, tuple) else (ax,))
          n = math.prod(mesh.shape[a] for a in axes) if axes else 1
          if dim % n:
            raise ValueError(f"parameter {name} {leaf.shape}: dim {dim} not "
                             f"divisible by mesh axes {axes} ({n})")
        return NamedSharding(mesh, spec)
    raise ValueError(f"parameter {name} matches no rule in "
                     f"config.sharding.params={list(rules)}")

  return jax.tree_util.tree_map_with_path(one, abstract_params)


def opt_shardings(abstract_opt, p_shardings, abstract_params, mesh):
  """Optimizer moments follow their parameter; everything else replicates."""
  by_path = {}
  for (path, sh), leaf in zip(
      jax.tree_util.tree_flatten_with_path(p_shardings)[0],
      jax.tree.leaves(abstract_params)):
    by_path[path_str(path)] = (sh, leaf.shape)
  names = set(by_path)

  def one(path, leaf):
    full = path_str(path)
    # Opt paths look like '0/mu/conv1/...': find the param path suffix.
    parts = full.split("/")
    for i in range(len(parts)):
      cand = "/".join(parts[i:])
      if cand in names and by_path[cand][1] == leaf.shape:
        return by_path[cand][0]
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(one, abstract_opt)


# ------------------------------------------------------------- the step


def make_optimizer(config) -> optax.GradientTransformation:
  """AdamW (torch defaults) with its numbers held in the optimizer state.

  inject_hyperparams keeps lr/betas/eps/decay out of the compiled step (one
  compilation serves any lr; the lr is checkpointed with the moments).
  """
  parts = []
  if config.grad_clip_norm and config.grad_clip_norm > 0:
    parts.append(optax.inject_hyperparams(optax.clip_by_global_norm)(
        max_norm=float(config.grad_clip_norm)))
  parts.append(optax.inject_hyperparams(optax.adamw)(
      learning_rate=float(config.lr), b1=float(config.b1),
      b2=float(config.b2), eps=float(config.eps),
      weight_decay=float(config.weight_decay)))
  return optax.chain(*parts)


def to_input(vmap_u8: jax.Array, channels: int) -> jax.Array:
  """(B,H,W) uint8 -> (B,H,W,C) float32 in [0,1] (ToTensor on a gray->RGB map)."""
  x = vmap_u8.astype(jnp.float32) / 255.0
  return jnp.broadcast_to(x[..., None], x.shape + (channels,))


def _mask_batch(key, x, min_ratio, mcfg):
  return masking.apply_grid_mask(key, x, min_ratio=min_ratio,
                                 max_ratio=mcfg["max_ratio"],
                                 k_min=mcfg["k_min"], k_max=mcfg["k_max"])


def train_step(state, rest, vmap_u8, min_ratio, base_key, *, graphdef, tx,
               mcfg, channels):
  """One AdamW step. state = {'params', 'opt_state', 'step'}."""
  step = state["step"]
  key = jax.random.fold_in(base_key, step)
  x = to_input(vmap_u8, channels)
  xm, info = _mask_batch(key, x, min_ratio, mcfg)

  def loss_fn(params):
    model = nnx.merge(graphdef, params, rest)
    y = model(xm)
    return jnp.mean(jnp.square(y.astype(jnp.float32) - x))

  loss, grads = jax.value_and_grad(loss_fn)(state["params"])
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  metrics = dict(loss=loss, grad_norm=optax.tree.norm(grads),
                 param_norm=optax.tree.norm(params),
                 mask_ratio=1.0 - jnp.mean(info["keep"]),
                 gamma=jnp.mean(info["gamma"]),
                 grid_k=jnp.mean(info["k"].astype(jnp.float32)))
  return dict(params=params, opt_state=opt_state, step=step + 1), metrics


def panel_fn(params, rest, vmap_u8, min_ratio, step, base_key, *, graphdef,
             mcfg, channels):
  """Masked input, output, target, |f(x)| for the step's own mask draw."""
  key = jax.random.fold_in(base_key, step)
  x = to_input(vmap_u8, channels)
  xm, _ = _mask_batch(key, x, min_ratio, mcfg)
  model = nnx.merge(graphdef, params, rest)
  f = model.body(xm).astype(jnp.float32)
  y = xm + f
  a = jnp.mean(jnp.abs(f), axis=-1, keepdims=True)
  return dict(masked=xm, output=y, target=x, anomaly=a)


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


def _mesh(config):
  n = int(config.mesh.data)
  devices = jax.devices()
  if n != -1:
    if n > len(devices):
      raise ValueError(f"config.mesh.data={n} but only {len(devices)} devices")
    devices = devices[:n]
  return sharding_lib.make_mesh([(sharding_lib.DATA_AXIS, len(devices))],
                                devices=devices)


# Run-once functions (random init) gain nothing from XLA's optimisation passes,
# which take tens of seconds on threefry-heavy graphs on CPU; the values are
# integer/bit ops, identical either way.
_FAST_COMPILE = {"xla_backend_optimization_level": 0,
                 "xla_llvm_disable_expensive_passes": True}


def _compile_once(fn, out_shardings, *args):
  return jax.jit(fn, out_shardings=out_shardings).lower(*args).compile(
      compiler_options=_FAST_COMPILE)


# Jitted functions per (model graph, mesh, shardings, masking, optimizer
# structure): a second run in the same process (resume, notebook re-run,
# tests) reuses the compilation instead of paying for it again.
_JIT_CACHE: dict = {}


def _cached(key, make):
  if key not in _JIT_CACHE:
    _JIT_CACHE[key] = make()
  return _JIT_CACHE[key]


def _spec_key(shardings) -> tuple:
  return tuple((path_str(p), str(s.spec)) for p, s in
               jax.tree_util.tree_flatten_with_path(shardings)[0])


def _raise_nonfinite(step: int, loss: float, epoch: int, mngr):
  last = mngr.latest_step() if mngr is not None else None
  raise NonFiniteLossError(
      f"non-finite loss ({loss}) at step {step} (epoch {epoch}); training "
      f"stopped. Last good checkpoint: step {last}. Lower config.lr, check the "
      "input maps for NaN/Inf, or set config.grad_clip_norm.")


# --------------------------------------------------------------- driver


class _JsonlWriter:
  """clu MetricWriter subset for machines without TensorFlow (clu's
  TensorBoard writer imports it; jax-only GPU/TPU images often lack it):
  scalars to WORKDIR/metrics.jsonl, image panels to WORKDIR/panels/*.png."""

  def __init__(self, workdir: str, just_logging: bool):
    self.workdir, self.just_logging = workdir, just_logging

  def write_hparams(self, hparams):
    if not self.just_logging:
      with open(os.path.join(self.workdir, "hparams.json"), "w") as f:
        json.dump(hparams, f, indent=1, sort_keys=True)

  def write_scalars(self, step, scalars):
    logging.info("step %d: %s", step, scalars)
    if not self.just_logging:
      with open(os.path.join(self.workdir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(dict(step=int(step), **{
            k: float(v) for k, v in scalars.items()})) + "\n")

  def write_images(self, step, images):
    if self.just_logging:
      return
    from PIL import Image  # pylint: disable=g-import-not-at-top
    d = os.path.join(self.workdir, "panels")
    os.makedirs(d, exist_ok=True)
    for name, v in images.items():
      row = np.concatenate(list(np.asarray(v)), axis=1)  # (k,H,W,C) in a row
      row = (np.clip(row, 0, 1) * 255).astype(np.uint8)
      Image.fromarray(row[..., 0] if row.shape[-1] == 1 else row).save(
          os.path.join(d, f"{int(step):08d}_{name}.png"))

  def flush(self):
    pass

  def close(self):
    pass


def _metric_writer(workdir: str, just_logging: bool):
  try:
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    logging.warning("TensorBoard summaries off (%s: TensorBoard event files "
                    "need pip install 'efiqa-jax[tf]'); metrics go to "
                    "%s/metrics.jsonl", e, workdir)
    return _JsonlWriter(workdir, just_logging)
  return metric_writers.create_default_writer(
      workdir, just_logging=just_logging, asynchronous=False)



def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       _stop_after_steps: int | None = None) -> TrainResult:
  """Trains (or resumes) a VUAD teacher in `workdir`; exports it at the end.

  `_stop_after_steps` (tests only) returns abruptly after that many steps of
  THIS call, without the final checkpoint or export, like a killed job.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from tqdm import auto as tqdm  # pylint: disable=g-import-not-at-top
  from efiqa_jax import input_pipeline  # pylint: disable=g-import-not-at-top

  _check_config(config)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  pi, pc = jax.process_index(), jax.process_count()
  logging.info("process %d/%d, %d devices (%d local)", pi, pc,
               jax.device_count(), jax.local_device_count())

  # ---- data
  maps, diam, desc = data_lib.load_vessel_maps(
      config.data, cache_dir=os.path.join(workdir, "data"))
  n = len(maps)
  gbs = int(config.batch_size)
  total_steps = int(config.num_epochs) * n // gbs
  if total_steps < 1:
    raise ValueError(f"{n} maps x {config.num_epochs} epochs is less than one "
                     f"batch of {gbs}")
  mesh = _mesh(config)
  batch_sh = sharding_lib.data_sharding(mesh)
  repl = sharding_lib.replicated(mesh)
  sharding_lib.local_batch_size(gbs, batch_sh, pc)  # validates divisibility
  records = data_lib.TrainRecords(
      maps, diam, seed=config.seed, global_batch=gbs, process_index=pi,
      process_count=pc, aug_cfg=_aug_config(config),
      fov_p_max=config.augment.fov_p_max, fov_start=config.augment.fov_start,
      fov_end=config.augment.fov_end)
  it = data_lib.make_train_iterator(records, total_steps,
                                    num_threads=config.data.num_threads,
                                    prefetch=config.data.prefetch)

  # ---- model + optimizer, created directly in their sharded layout
  tx = make_optimizer(config)
  abstract_model = nnx.eval_shape(
      lambda: build_model(config, nnx.Rngs(config.seed)))
  graphdef, abs_params, abs_rest = nnx.split(abstract_model, nnx.Param, ...)
  p_sh = param_shardings(abs_params, config.sharding.params, mesh)
  rest_sh = jax.tree.map(lambda _: repl, abs_rest)

  def init_fn():
    m = build_model(config, nnx.Rngs(config.seed))
    _, p, r = nnx.split(m, nnx.Param, ...)
    return p, r

  mesh_key = (tuple(mesh.devices.flat), mesh.axis_names)
  params, rest = _cached(
      ("init", graphdef, int(config.seed), mesh_key, _spec_key(p_sh)),
      lambda: _compile_once(init_fn, (p_sh, rest_sh)))()
  abs_opt = jax.eval_shape(tx.init, abs_params)
  o_sh = opt_shardings(abs_opt, p_sh, abs_params, mesh)
  opt_state = _compile_once(tx.init, o_sh, params)(params)
  state = dict(params=params, opt_state=opt_state,
               step=_scalar(np.int32(0), repl))
  state_sh = dict(params=p_sh, opt_state=o_sh, step=repl)
  nparams = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abs_params))
  logging.info("U-Net %s: %d parameters", model_kwargs(config), nparams)
  for path, s in jax.tree_util.tree_flatten_with_path(p_sh)[0]:
    logging.debug("param %s: %s", path_str(path), s.spec)

  # ---- checkpoints: resume automatically
  ckpt_dir = os.path.join(workdir, "checkpoints")
  mngr = ocp.CheckpointManager(
      ckpt_dir, options=ocp.CheckpointManagerOptions(
          max_to_keep=int(config.keep_checkpoints), create=True,
          enable_async_checkpointing=False))
  start = 0
  if mngr.latest_step() is not None:
    start = int(mngr.latest_step())
    target = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
        state)
    restored = mngr.restore(start, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target),
        data_iter=input_pipeline.iterator_checkpoint_args(it, restore=True)))
    state = restored["state"]
    if int(jax.device_get(state["step"])) != start:
      raise RuntimeError(f"checkpoint {start} holds step "
                         f"{int(jax.device_get(state['step']))}")
    logging.info("resumed from %s at step %d", ckpt_dir, start)
  cfg_file = os.path.join(workdir, "config.json")
  # Process 0 alone reads and rewrites it: another process reading while it
  # is rewritten saw an empty file (a 2-process resume died on it in CI).
  if pi == 0 and start and os.path.exists(cfg_file):
    with open(cfg_file) as f:
      old_cfg = _flat(json.load(f))
    new_cfg = _flat(json.loads(config.to_json_best_effort()))
    diff = sorted(k for k in old_cfg.keys() | new_cfg.keys()
                  if old_cfg.get(k) != new_cfg.get(k))
    if diff:
      logging.warning("resuming with a config that differs from the one in "
                      "%s in %s (optimizer numbers come from the checkpoint)",
                      cfg_file, diff)
  if pi == 0:
    with open(cfg_file + ".tmp", "w") as f:
      f.write(config.to_json_best_effort(indent=2))
    os.replace(cfg_file + ".tmp", cfg_file)  # never seen half-written

  # ---- jitted functions
  # Built inside jit: a global replicated key on every process.
  base_key = jax.jit(lambda: jax.random.key(int(config.seed)),
                     out_shardings=repl)()
  mcfg = dict(k_min=int(config.mask.k_min), k_max=int(config.mask.k_max),
              max_ratio=float(config.mask.max_ratio))
  channels = int(config.model.in_channels)
  jit_key = (graphdef, mesh_key, _spec_key(p_sh), _spec_key(o_sh),
             jax.tree.structure(abs_opt), tuple(sorted(mcfg.items())),
             channels)
  step_fn = _cached(("step",) + jit_key, lambda: jax.jit(
      functools.partial(train_step, graphdef=graphdef, tx=tx, mcfg=mcfg,
                        channels=channels),
      in_shardings=(state_sh, rest_sh, batch_sh, repl, repl),
      out_shardings=(state_sh, repl), donate_argnums=(0,)))
  panels = _cached(("panels",) + jit_key, lambda: jax.jit(
      functools.partial(panel_fn, graphdef=graphdef, mcfg=mcfg,
                        channels=channels),
      in_shardings=(p_sh, rest_sh, batch_sh, repl, repl, repl),
      out_shardings=repl))

  writer = _metric_writer(workdir, just_logging=pi > 0)
  if start == 0:
    writer.write_hparams({k: v for k, v in _flat(config.to_dict()).items()
                          if isinstance(v, (int, float, str, bool))})

  def save(step_done: int):
    mngr.save(step_done, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data_iter=input_pipeline.iterator_checkpoint_args(it)))

  if pc > 1 and start < total_steps:
    # Compile before the first collective, then line the processes up: gloo
    # gives up on a collective after 30 s, and one process may still be
    # importing TensorBoard or compiling while the other already steps.
    lbs = sharding_lib.local_batch_size(gbs, batch_sh, pc)
    s_in = int(config.image_size)
    abs_batch = jax.ShapeDtypeStruct((gbs, s_in, s_in), jnp.uint8,
                                     sharding=batch_sh)
    abs_f = jax.ShapeDtypeStruct((), jnp.float32, sharding=repl)
    step_fn.lower(state, rest, abs_batch, abs_f, base_key).compile()
    if config.image_every:
      panels.lower(state["params"], rest, abs_batch, abs_f,
                   jax.ShapeDtypeStruct((), jnp.int32, sharding=repl),
                   base_key).compile()
    del lbs
    ocp.multihost.sync_global_processes("efiqa_teacher_train_start")

  history, window, pending = [], [], None
  bar = tqdm.tqdm(total=total_steps, initial=start, desc="train-teacher",
                  disable=not config.progress_bar or pi > 0, leave=False)
  t0, done_here = time.time(), 0
  step = start
  try:
    for step in range(start, total_steps):
      host = next(it)
      epoch = step * gbs // n
      min_ratio, fov_p = _schedule_values(config, epoch)
      gbatch = sharding_lib.to_global(host, batch_sh, keys=["vmap"])
      mr = _scalar(np.float32(min_ratio), repl)
      prev_state_step = step
      state, metrics = step_fn(state, rest, gbatch["vmap"], mr, base_key)
      # Lagged non-finite check keeps the host one step ahead of the device.
      if pending is not None:
        _check_finite(pending, n, gbs, mngr)
      pending = (prev_state_step + 1, metrics)
      window.append(dict(metrics, fov_crop=np.mean(host["fov_crop"]),
                         min_ratio=min_ratio, fov_p=fov_p, epoch=epoch))
      done = step + 1
      done_here += 1
      if done % config.log_every == 0 or done == total_steps:
        _check_finite(pending, n, gbs, mngr)
        vals = jax.device_get(window)
        scal = {k: float(np.mean([v[k] for v in vals])) for k in vals[0]}
        scal["lr"] = float(config.lr)
        scal["steps_per_sec"] = done_here / max(time.time() - t0, 1e-9)
        writer.write_scalars(done, scal)
        history.append((done, scal["loss"]))
        bar.set_postfix(loss=f"{scal['loss']:.4g}", mask=f"{scal['mask_ratio']:.2f}")
        window = []
      if config.image_every and done % config.image_every == 0:
        k = min(int(config.num_panel_images), records.lbs)
        out = jax.device_get(panels(state["params"], rest, gbatch["vmap"], mr,
                                    _scalar(np.int32(step), repl), base_key))
        writer.write_images(done, {
            name: np.clip(np.asarray(v[:k]), 0.0, 1.0) if name != "anomaly"
            else np.clip(np.asarray(v[:k]) / max(float(np.max(v[:k])), 1e-6),
                         0, 1)
            for name, v in out.items()})
      if done % config.checkpoint_every == 0 and done < total_steps:
        _check_finite(pending, n, gbs, mngr)  # never checkpoint a NaN state
        save(done)
      bar.update(1)
      if _stop_after_steps is not None and done_here >= _stop_after_steps:
        writer.flush()
        bar.close()
        return TrainResult(workdir, done, total_steps, history, None, graphdef,
                           None, desc)
    if pending is not None:
      _check_finite(pending, n, gbs, mngr)
  finally:
    bar.close()
    writer.flush()

  final_step = int(jax.device_get(state["step"]))
  if mngr.latest_step() != final_step:
    save(final_step)
  mngr.wait_until_finished()
  host_params = jax.tree.map(_to_host, state["params"])
  # Every process calls it: orbax's save synchronises all processes (the
  # numpy tree is written by the primary one).
  export_dir = export_model(config, workdir, graphdef, host_params,
                            jax.device_get(rest), desc, final_step,
                            total_steps, history)
  writer.close()
  mngr.close()
  return TrainResult(workdir, final_step, total_steps, history, host_params,
                     graphdef, export_dir, desc)


def _scalar(value: np.ndarray, repl) -> jax.Array:
  """A replicated global scalar (same value on every process)."""
  return sharding_lib.to_global({"v": np.asarray(value)}, repl)["v"]


def _to_host(x: jax.Array) -> np.ndarray:
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _check_finite(pending, n, gbs, mngr):
  step_done, metrics = pending
  loss = float(jax.device_get(metrics["loss"]))
  if not math.isfinite(loss):
    _raise_nonfinite(step_done, loss, (step_done - 1) * gbs // n, mngr)


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flat(v, key + "."))
    else:
      out[key] = v
  return out


def export_model(config, workdir, graphdef, params, rest, desc, step,
                 total_steps, history) -> str:
  """Writes WORKDIR/export with the generic `save_model` + metadata."""
  from efiqa_jax import checkpoints  # pylint: disable=g-import-not-at-top
  model = nnx.merge(graphdef, params, rest)
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
  out = os.path.join(workdir, "export")
  checkpoints.save_model(out, model, meta, overwrite=True)
  return out
