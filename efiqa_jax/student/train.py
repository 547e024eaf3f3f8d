"""Adapter distillation (EFIQA stage 2): `efiqa train-adapter`.

Two modes (config.mode):
  features    cached `efiqa extract` features + pseudo-labels. batching
              'patch' flattens every token of every image into one pool of
              patches (the reference `prepare_patch_dataset.py`; batch 4096
              patches); 'image' keeps whole (gh, gw, D) grids (the CNN head).
  end_to_end  photographs + pseudo-labels; the frozen encoder runs inside the
              jitted step (optionally in bfloat16), always per image.

Only the adapter is differentiated: the encoder's (graphdef, state) is a
plain, non-differentiated argument of the step, the optimizer is built on
the adapter's parameter dict alone, so neither gradients nor optimizer state
exist for encoder parameters. Batches are data-parallel over the mesh's
'data' axis (`sharding.to_global`), parameters replicated.

Workdir:
  checkpoints/<step>/   orbax CheckpointManager: {params, opt_state}; the
                        data order is a function of (seed, step), so the
                        step is all the data state there is.
  metrics.jsonl         clu-averaged loss per `log_every` steps.
  data.json             what was matched / left out, class balance.
  adapter/              final adapter (efiqa model format) for `assess`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any

import numpy as np

from efiqa_jax.student import data as data_lib


@dataclasses.dataclass
class TrainResult:
  workdir: str
  step: int               # steps done (== total unless stopped by max_steps)
  total_steps: int
  final_loss: float
  adapter_dir: str | None  # written only when training completed
  params: Any             # adapter parameters (pure dict, host numpy)
  opt_state: Any = None   # optimizer state (host numpy), adapter-only
  encoder_state: Any = None  # end_to_end: encoder params after training


def _load_training_data(config):
  """-> (make_batch, n_items, token grid (gh, gw, D), report dict, enc)."""
  from efiqa_jax import checkpoints, sources
  mode = config.mode
  labels = data_lib.label_files(config.labels_dir)
  if mode == "features":
    files, not_ok, meta = data_lib.feature_files(config.features_dir)
    rep = data_lib.match(files, labels, not_ok)
    if not rep.matched:
      raise ValueError(f"no feature file in {config.features_dir} has a "
                       f"label in {config.labels_dir}")
    f0 = files[rep.matched[0]]
    first = np.load(f0, mmap_mode="r") if isinstance(f0, str) else f0
    if first.ndim != 3:
      raise ValueError(f"features must be (gh, gw, D), got {first.shape}")
    grid = tuple(int(s) for s in first.shape)
    return files, rep, grid, labels, None, meta
  if mode == "end_to_end":
    paths = sources.list_inputs([config.images])
    ids = sources.unique_ids(paths)
    by_id = dict(zip(ids, paths))
    rep = data_lib.match(by_id, labels)
    if not rep.matched:
      raise ValueError(f"no photograph in {config.images} has a label in "
                       f"{config.labels_dir}")
    enc, enc_meta = checkpoints.load_model(config.encoder,
                                           dtype=config.encoder_dtype,
                                           frozen=True, kind="encoder")
    if getattr(enc, "ARCH", None) != "vit":
      raise ValueError(f"{config.encoder} is not a ViT encoder")
    p = enc.cfg["patch_size"]
    if config.size % p:
      raise ValueError(f"size {config.size} is not a multiple of {p}")
    grid = (config.size // p, config.size // p, enc.cfg["hidden_size"])
    return by_id, rep, grid, labels, enc, enc_meta
  raise ValueError(f"config.mode must be 'features' or 'end_to_end', got "
                   f"{mode!r}")


def _logged_loss(metrics_path: str, upto: int) -> float:
  """The last loss logged at or before step `upto` (a run resumed at its end
  re-exports the adapter with the loss it finished with, not NaN)."""
  loss = float("nan")
  if upto > 0 and os.path.exists(metrics_path):
    with open(metrics_path) as f:
      for line in f:
        try:
          row = json.loads(line)
        except ValueError:
          continue  # a line cut by a kill
        if row.get("step", upto + 1) <= upto:
          loss = float(row["loss"])
  return loss


def train_and_evaluate(config, workdir: str) -> TrainResult:
  """Trains the adapter described by `config` into `workdir` (resumes)."""
  import jax
  import jax.numpy as jnp
  import optax
  import orbax.checkpoint as ocp
  from clu import metrics as clu_metrics
  from flax import nnx

  from efiqa_jax import checkpoints
  from efiqa_jax import sharding as sh
  from efiqa_jax.models import adapters
  from efiqa_jax.student import losses

  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  items, rep, (gh, gw, d), labels, encoder, src_meta = _load_training_data(
      config)
  adapter = adapters.build_adapter(config.adapter.name, d,
                                   seed=int(config.seed),
                                   **dict(config.adapter.kwargs))
  oh, ow = adapter.output_grid(gh, gw)
  ids = rep.matched
  ys = []
  for i in ids:
    y = data_lib.read_label(labels[i])
    if y.shape != (oh, ow) and config.get("label_resize", "error") == "nearest":
      y = data_lib.resize_nearest(y, (oh, ow))
    if y.shape != (oh, ow):
      raise ValueError(f"label {labels[i]} is {y.shape[0]}x{y.shape[1]} but "
                       f"the adapter outputs {oh}x{ow} for {gh}x{gw} tokens "
                       "(pseudo-label --grid must match, or set "
                       "config.label_resize=nearest)")
    ys.append(y)

  batching = config.batching
  bsz = int(config.batch_size)
  flip = bool(config.get("augment_flip", False))
  if config.mode == "features" and batching == "patch":
    if (oh, ow) != (gh, gw):
      raise ValueError(f"patch batching needs a per-token adapter; "
                       f"{config.adapter.name} maps {gh}x{gw} -> {oh}x{ow}")
    x = np.stack([data_lib.load_features(items[i]).reshape(-1, d)
                  for i in ids]).reshape(-1, d)
    y = np.stack(ys).reshape(-1)
    make_batch = data_lib.PatchBatch(x, y, bsz, int(config.seed))
    n_items = len(x)
  elif batching == "image":
    if config.mode == "features":
      make_batch = data_lib.ImageFeatureBatch([items[i] for i in ids], ys,
                                              bsz, int(config.seed), flip)
    else:
      make_batch = data_lib.PixelBatch(
          [items[i] for i in ids], ys, bsz, int(config.seed), config.size,
          config.work_size, flip,
          cache_bytes=float(config.get("pixel_cache_gb", 4.0)) * 1e9)
      failed = make_batch.check()
      rep.not_ok.extend((ids[i], msg) for i, msg in failed)
      bad = {ids[i] for i, _ in failed}
      ys = [y for i, y in zip(ids, ys) if i not in bad]
      ids = [i for i in ids if i not in bad]
      if not ids:
        raise ValueError("no photograph could be prepared (see data.json)")
    n_items = len(ids)
  else:
    raise ValueError(f"batching must be 'patch' (features mode) or 'image', "
                     f"got {batching!r} in mode {config.mode!r}")
  pos = float(np.mean(np.stack(ys)))
  spe = data_lib.steps_per_epoch(n_items, bsz)
  total = spe * int(config.epochs)
  report = dict(rep.as_dict(), items=n_items, batching=batching,
                token_grid=[gh, gw, d], label_grid=[oh, ow],
                positive_fraction=pos, steps_per_epoch=spe,
                total_steps=total)
  if sh.is_primary():
    with open(os.path.join(workdir, "data.json"), "w") as f:
      json.dump(report, f, indent=2)
  for k in ("features_without_label", "labels_without_features", "not_ok"):
    if report[k]:
      print(f"train-adapter: {len(report[k])} {k.replace('_', ' ')} (listed "
            f"in {workdir}/data.json)", file=sys.stderr)

  mesh = sh.make_mesh([tuple(a) for a in config.mesh])
  dsh = sh.data_sharding(mesh)
  rep_sh = sh.replicated(mesh)
  if bsz % sh.batch_shards(dsh):
    raise ValueError(f"batch_size {bsz} is not divisible by the "
                     f"{sh.batch_shards(dsh)} data shards")

  graphdef, params = nnx.split(adapter, nnx.Param)
  params = jax.device_put(nnx.to_pure_dict(params), rep_sh)
  oc = config.optimizer
  tx = optax.adamw(oc.lr, b1=oc.b1, b2=oc.b2, eps=oc.eps,
                   weight_decay=oc.weight_decay)
  opt_state = jax.jit(tx.init, out_shardings=rep_sh)(params)
  if encoder is not None:
    # Replicated, or sharded over the mesh by regex rules (large encoders),
    # exactly as `efiqa extract` places them.
    from efiqa_jax import features as feats_lib
    enc_graphdef, enc_state = feats_lib.place_frozen_encoder(
        encoder, mesh, feats_lib.parse_param_rules(
            list(config.get("param_sharding", ()))))
  else:
    enc_graphdef, enc_state = None, None
  lc = config.loss
  seed_key = jax.random.key(int(config.seed))
  stochastic = config.adapter.name not in ("linear", "sc_linear", "mlp")

  def features_of(enc_state, batch):
    if enc_graphdef is None:
      return batch["x"]
    enc = nnx.merge(enc_graphdef, enc_state)
    z = enc.patch_features(batch["pixels"])
    # Frozen: no gradient can flow into the encoder from the adapter loss.
    return jax.lax.stop_gradient(z.astype(jnp.float32))

  def train_step(params, opt_state, enc_state, batch, step):
    z = features_of(enc_state, batch)
    key = jax.random.fold_in(seed_key, step) if stochastic else None

    def loss_fn(p):
      logits = nnx.merge(graphdef, p)(z, key=key)
      return losses.distill_loss(lc.name, logits, batch["y"], batch["mask"],
                                 pos_weight=lc.pos_weight, pi=lc.pi,
                                 beta=lc.beta)

    (loss, valid), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, new_opt = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    # A batch the loss skips (nnPU without P or U) makes no optimizer step.
    keep = valid > 0
    new_params = jax.tree.map(lambda a, b: jnp.where(keep, a, b), new_params,
                              params)
    new_opt = jax.tree.map(lambda a, b: jnp.where(keep, a, b), new_opt,
                           opt_state)
    return new_params, new_opt, loss, valid

  step_fn = jax.jit(train_step, donate_argnums=(0, 1),
                    out_shardings=(rep_sh, rep_sh, rep_sh, rep_sh))

  ckpt_dir = os.path.join(workdir, "checkpoints")
  mngr = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(
      max_to_keep=int(config.keep_checkpoints),
      save_interval_steps=int(config.checkpoint_every)))
  # What a resume must agree with: the data order and the optimisation.
  fp = {"ids": ids, "items": n_items, "batch_size": bsz,
        "seed": int(config.seed), "epochs": int(config.epochs),
        "adapter": config.adapter.to_dict(), "loss": config.loss.to_dict(),
        "optimizer": config.optimizer.to_dict(), "mode": config.mode,
        "batching": batching}
  fp = _jsonable(fp)
  fp_path = os.path.join(workdir, "run.json")
  if mngr.latest_step() is not None and os.path.exists(fp_path):
    with open(fp_path) as f:
      old = json.load(f)
    diff = sorted(k for k in set(fp) | set(old) if fp.get(k) != old.get(k))
    if diff:
      raise ValueError(f"{workdir} holds a run with different {diff}; "
                       "resume needs the same data and config (use a new "
                       "--workdir)")
  # Every process has read run.json before the primary rewrites it.
  sh.barrier("efiqa_train_adapter_fingerprint")
  if sh.is_primary():
    with open(fp_path, "w") as f:
      json.dump(fp, f)
  start = 0
  if mngr.latest_step() is not None:
    start = int(mngr.latest_step())
    target = {"params": params, "opt_state": opt_state}
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    restored = mngr.restore(start, args=ocp.args.StandardRestore(abstract))
    params, opt_state = restored["params"], restored["opt_state"]
    print(f"train-adapter: resumed at step {start}/{total}", file=sys.stderr)
  stop = total
  if int(config.max_steps) > 0:
    stop = min(total, int(config.max_steps))

  metrics_path = os.path.join(workdir, "metrics.jsonl")
  Avg = clu_metrics.Average.from_output("loss")
  avg = None
  last_loss = _logged_loss(metrics_path, start)
  keys = ["pixels" if encoder is not None else "x", "y", "mask"]
  bar = None
  if config.get("progress", True) and stop > start:
    from tqdm.auto import tqdm
    bar = tqdm(total=stop - start, desc="train-adapter", unit="step",
               file=sys.stderr)
  it = data_lib.step_dataset(make_batch, start, stop,
                             threads=int(config.data_threads))
  step = start
  with jax.set_mesh(mesh), open(metrics_path, "a") as mf:
    if bsz % jax.process_count():
      raise ValueError(f"batch_size {bsz} is not divisible by the "
                       f"{jax.process_count()} processes")
    for host in it:
      # Every process builds the whole global batch and feeds its rows.
      batch = sh.global_from_full(host, dsh, keys)
      params, opt_state, loss, valid = step_fn(params, opt_state, enc_state,
                                               batch, jnp.int32(step))
      step += 1
      # Accumulated on device (no host sync per step); skipped nnPU batches
      # are masked out of the average.
      upd = Avg.from_model_output(loss=loss[None], mask=(valid > 0)[None])
      avg = upd if avg is None else avg.merge(upd)
      if step % int(config.log_every) == 0 or step == stop:
        if avg is not None and float(avg.count) > 0:
          last_loss = float(avg.compute())
          mf.write(json.dumps({"step": step, "epoch": step / spe,
                               "loss": last_loss}) + "\n")
          mf.flush()
        avg = None
      mngr.save(step, args=ocp.args.StandardSave(
          {"params": params, "opt_state": opt_state}),
                force=(step == total))
      if bar is not None:
        bar.update(1)
        if step % int(config.log_every) == 0:
          bar.set_postfix(loss=f"{last_loss:.4f}")
  if bar is not None:
    bar.close()
  mngr.wait_until_finished()
  mngr.close()

  host_params = jax.tree.map(lambda a: np.asarray(jax.device_get(a)), params)
  adapter_dir = None
  if step >= total:
    final = nnx.merge(graphdef, host_params)
    adapter_dir = os.path.join(workdir, "adapter")
    meta = {"training": {"config": config.to_dict(), "steps": total,
                         "final_loss": last_loss, "data": report},
            "features": {k: src_meta.get(k) for k in (
                "size", "work_size", "crop", "preprocessing", "grid",
                "encoder", "architecture") if k in src_meta}}
    checkpoints.save_model(adapter_dir, final, _jsonable(meta),
                           overwrite=True)
  to_host = lambda t: jax.tree.map(lambda a: np.asarray(jax.device_get(a)), t)
  return TrainResult(workdir, step, total, last_loss, adapter_dir,
                     host_params, to_host(opt_state),
                     None if enc_state is None else to_host(
                         nnx.to_pure_dict(enc_state)))


def _jsonable(obj):
  return json.loads(json.dumps(obj, default=str))
