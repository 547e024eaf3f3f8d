"""Adapter distillation (EFIQA stage 2): `efiqa train-adapter`.

Two modes (config.mode):
  features    cached `efiqa extract` features + pseudo-labels. batching
              'patch' flattens every token of every image into one pool of
              patches (the reference `prepare_patch_dataset.py`; batch 4096
              patches); 'image' keeps whole (gh, gw, D) grids (the CNN head).
  end_to_end  photographs (or a folder of `efiqa prepare`) + pseudo-labels;
              the frozen encoder runs inside the jitted step (optionally in
              bfloat16), always per image.
Both stream (`student.data`): records are read per step through
`input_pipeline.training_batches`, each process only its rows of every
global batch; nothing is loaded whole.

A task on `efiqa_jax.trainer`. Only the adapter is differentiated (the
trainable filter): the encoder is a frozen part of the model, restored from
its checkpoint straight into the shardings `config.sharding.params` gives
it (replicated, it runs in its inference form), and neither gradients nor
optimizer state exist for its parameters. Batches are split over the
mesh's batch axes (`config.mesh`).

Preprocessing (`config.preprocess`, efiqa | fov, `encoders.preprocess`): in
features mode the features' metadata.json says what they were made with
(an explicit config value must agree); end to end it is the config's
(default fov). The exported adapter records it (`features.preprocess`,
size, work_size), and `efiqa assess --model student` follows that record.
Labels made by `efiqa pseudo-label --from-photos` are on the FOV crop's
frame: training them against efiqa (whole-photograph) inputs is refused
(`efiqa distill --preprocess efiqa` maps them to the photograph's frame).

Workdir:
  checkpoints/<step>/   async orbax checkpoints: state, data-iterator state,
                        run fingerprint (a changed config is refused).
  metrics.jsonl         loss (skipped nnPU batches left out), lr, norms per
                        `log_every` steps; TensorBoard events beside it.
  run.json              the run fingerprint.
  data.json             what was matched / left out, class balance.
  adapter/              final adapter (efiqa model format) for `assess`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from typing import Any

import numpy as np

from efiqa_jax import files as files_lib
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


def label_frame(labels_dir: str) -> str | None:
  """The frame pseudo-labels are on, from their spec.json: 'fov' (`efiqa
  pseudo-label --from-photos`: the FOV crop), 'efiqa' (the photograph,
  written by `efiqa distill --preprocess efiqa`); None when unknown
  (vessel-map inputs, plain PNG folders)."""
  path = os.path.join(labels_dir, "spec.json")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    spec = json.load(f)
  if spec.get("frame") in ("efiqa", "fov"):
    return spec["frame"]
  return "fov" if spec.get("from_photos") else None


def resolve_preprocess(config, features_meta: dict | None
                       ) -> tuple[str | None, str]:
  """(preprocess, where it came from) for a training run; None for features
  that do not say (a plain folder of .npy) when the config does not
  either."""
  from efiqa_jax.encoders import preprocess as pp
  given = config.get("preprocess")
  if given is not None:
    pp.check_preprocess(given)
  if config.mode == "features":
    made = pp.recorded_preprocess(features_meta or {})
    if made is not None and given is not None and made != given:
      raise ValueError(f"config.preprocess={given} but the features in "
                       f"{config.features_dir} were made with {made}")
    if made is not None:
      return made, "the features' metadata"
    if given is not None:
      return given, "config.preprocess"
    return None, "unknown"
  if given is not None:
    return given, "config.preprocess"
  return pp.DEFAULT_PREPROCESS, "default"


def _load_training_data(config, enc_meta=None, preprocess=None):
  """-> (items, report, token grid (gh, gw, D), labels, source metadata);
  end to end, items is a `data.EncoderInputs`."""
  mode = config.mode
  labels = data_lib.label_files(config.labels_dir)
  if mode == "features":
    # Indexed, not loaded: features are read per record while training.
    store = data_lib.FeatureStore(config.features_dir)
    rep = data_lib.match(store.ids, labels, store.not_ok)
    if not rep.matched:
      raise ValueError(f"no feature file in {config.features_dir} has a "
                       f"label in {config.labels_dir}")
    first = store.read(rep.matched[0])
    if first.ndim != 3:
      raise ValueError(f"features must be (gh, gw, D), got {first.shape}")
    grid = tuple(int(s) for s in first.shape)
    return store, rep, grid, labels, store.meta
  if mode == "end_to_end":
    p = int(enc_meta["kwargs"]["patch_size"])
    if config.size % p:
      raise ValueError(f"size {config.size} is not a multiple of {p}")
    # Photographs are checked once (the labelled ones); a prepared folder's
    # manifest says which records are ok. Nothing is kept but the ids.
    inputs = data_lib.encoder_inputs(
        config.images, size=int(config.size), work_size=int(config.work_size),
        preprocess=preprocess, wanted=set(labels))
    rep = data_lib.match(inputs.by_id, labels, inputs.not_ok)
    if not rep.matched:
      raise ValueError(f"no usable photograph in {config.images} has a "
                       f"label in {config.labels_dir}")
    grid = (config.size // p, config.size // p,
            int(enc_meta["kwargs"]["hidden_size"]))
    return inputs, rep, grid, labels, enc_meta
  raise ValueError(f"config.mode must be 'features' or 'end_to_end', got "
                   f"{mode!r}")


@functools.lru_cache(maxsize=None)
def _encoder_adapter_cls():
  from flax import nnx

  class EncoderAdapter(nnx.Module):
    """The frozen encoder (end to end; None on cached features) and the
    trained adapter, as one model for the trainer."""

    def __init__(self, encoder, adapter):
      self.encoder = encoder
      self.adapter = adapter

  return EncoderAdapter


def train_config(config, total_steps: int):
  """The trainer's settings from an adapter config."""
  from efiqa_jax import trainer
  oc = config.optimizer
  return trainer.TrainConfig(
      total_steps=total_steps, seed=int(config.seed), lr=float(oc.lr),
      b1=float(oc.b1), b2=float(oc.b2), eps=float(oc.eps),
      weight_decay=float(oc.weight_decay),
      grad_clip_norm=float(oc.get("grad_clip_norm", 0.0) or 0.0),
      schedule=trainer.schedule_config(config), mesh=config.mesh,
      rules=list(config.sharding.params),
      checkpoint_every=int(config.checkpoint_every),
      keep_checkpoints=int(config.keep_checkpoints),
      log_every=int(config.log_every), progress=bool(config.progress),
      profile_steps=str(config.get("profile_steps", "") or ""),
      max_steps=int(config.max_steps))


# Paths may move (a copied workdir, another mount); what they hold is in
# the fingerprint (matched ids, the encoder's sha).
_PATH_KEYS = ("features_dir", "labels_dir", "images", "encoder")


def train_and_evaluate(config, workdir: str) -> TrainResult:
  """Trains the adapter described by `config` into `workdir` (resumes).

  Raises `runtime.Interrupted` when stopped by SIGTERM / Ctrl-C (after a
  checkpoint), ValueError on a bad config or a workdir holding a run with
  other settings.
  """
  import hashlib

  import jax
  import jax.numpy as jnp
  from flax import nnx

  from efiqa_jax import checkpoints
  from efiqa_jax import runtime
  from efiqa_jax import sharding as sh
  from efiqa_jax import trainer
  from efiqa_jax.models import adapters
  from efiqa_jax.kernels import vit_inference
  from efiqa_jax.models import vit
  from efiqa_jax.student import losses

  runtime.initialize()
  workdir = files_lib.output_dir(workdir)
  e2e = config.mode == "end_to_end"
  enc_meta = None
  if e2e:
    enc_meta = checkpoints.check_kind(config.encoder, "encoder")
    if enc_meta["architecture"] != "vit":
      raise ValueError(f"{config.encoder} is not a ViT encoder")
  from efiqa_jax.encoders import preprocess as pp
  if e2e:  # the config's (the photographs are prepared with it)
    preprocess, origin = resolve_preprocess(config, None)
    items, rep, (gh, gw, d), labels, src_meta = _load_training_data(
        config, enc_meta, preprocess)
  else:  # what the features' metadata says
    items, rep, (gh, gw, d), labels, src_meta = _load_training_data(config)
    preprocess, origin = resolve_preprocess(config, src_meta)
  if preprocess is None:
    print(f"train-adapter: {config.features_dir} does not say how its "
          "features were made; the adapter records no preprocessing (set "
          "config.preprocess=efiqa|fov)", file=sys.stderr)
  frame = label_frame(config.labels_dir)
  if None not in (frame, preprocess) and frame != preprocess:
    raise ValueError(
        f"the labels in {config.labels_dir} are on the "
        f"{'FOV crop' if frame == 'fov' else 'whole photograph'} but the "
        f"encoder inputs are {preprocess} ({origin}); use labels of the same "
        "frame (efiqa distill --preprocess efiqa maps them)")
  ada_kwargs = dict(config.adapter.kwargs)
  oh, ow = nnx.eval_shape(lambda: adapters.build_adapter(
      config.adapter.name, d, **ada_kwargs)).output_grid(gh, gw)
  ids = rep.matched
  label_resize = config.get("label_resize", "error")

  def label(i):
    y = data_lib.read_label(labels[i])
    if y.shape != (oh, ow) and label_resize == "nearest":
      y = data_lib.resize_nearest(y, (oh, ow))
    if y.shape != (oh, ow):
      raise ValueError(f"label {labels[i]} is {y.shape[0]}x{y.shape[1]} but "
                       f"the adapter outputs {oh}x{ow} for {gh}x{gw} tokens "
                       "(pseudo-label --grid must match, or set "
                       "config.label_resize=nearest)")
    return y

  batching = config.batching
  bsz = int(config.batch_size)
  flip = bool(config.get("augment_flip", False))
  # Streamed: labels are checked here and read again per record, so
  # nothing grows with the dataset but the ids.
  pos = float(np.mean([label(i).mean() for i in ids]))
  if e2e:
    if batching != "image":
      raise ValueError("mode 'end_to_end' trains on whole photographs: set "
                       "batching='image'")
    streamed = data_lib.Labelled(items.source, [items.by_id[i] for i in ids],
                                 [labels[i] for i in ids])
    rows = data_lib.EncoderRows(int(config.size), int(config.work_size),
                                preprocess, (oh, ow), label_resize)
  elif batching in ("patch", "image"):
    per_token = batching == "patch"
    if per_token and (oh, ow) != (gh, gw):
      raise ValueError(f"patch batching needs a per-token adapter; "
                       f"{config.adapter.name} maps {gh}x{gw} -> {oh}x{ow}")
    # patch: the pool of every token of every image (the reference
    # prepare_patch_dataset.py), one record per token.
    streamed = data_lib.FeatureRecords(ids, [labels[i] for i in ids],
                                       gh * gw if per_token else None)
    rows = data_lib.FeatureRows(items, (gh, gw, d), (oh, ow), label_resize,
                                per_token)
  else:
    raise ValueError(f"batching must be 'patch' or 'image', got "
                     f"{batching!r}")
  n_items = len(streamed)
  # Each epoch ends with a partial batch padded with mask-0 rows (the
  # reference's DataLoader without drop_last; static shapes for jit).
  spe = -(-n_items // bsz)
  total = spe * int(config.epochs)
  report = dict(rep.as_dict(), items=n_items, batching=batching,
                token_grid=[gh, gw, d], label_grid=[oh, ow],
                positive_fraction=pos, steps_per_epoch=spe,
                total_steps=total)
  if runtime.is_primary():
    _atomic_json(files_lib.join(workdir, "data.json"), report)
  for k in ("features_without_label", "labels_without_features", "not_ok"):
    if report[k]:
      print(f"train-adapter: {len(report[k])} {k.replace('_', ' ')} (listed "
            f"in {workdir}/data.json)", file=sys.stderr)

  tc = train_config(config, total)
  mesh = sh.mesh_from_config(tc.mesh)
  rules = sh.parse_rules(tc.rules)
  enc_dtype = jnp.dtype(config.encoder_dtype)
  replicated_encoder = True
  enc_kwargs = None
  if e2e:
    enc_kwargs = dict(enc_meta["kwargs"], dtype=enc_dtype)
    abstract_enc = checkpoints.build_abstract("vit", enc_kwargs)
    enc_sh = sh.tree_shardings(
        {"encoder": nnx.to_pure_dict(nnx.state(abstract_enc, nnx.Param))},
        rules, mesh)
    replicated_encoder = all(s.is_fully_replicated
                             for s in jax.tree.leaves(enc_sh))
  EncoderAdapter_ = _encoder_adapter_cls()

  def build():
    enc = None
    if e2e:
      enc = vit.VisionTransformer(**enc_kwargs, rngs=nnx.Rngs(0))
      # As loaded for inference: 16-bit kernels in the compute dtype; the
      # fused inference form where the encoder is replicated.
      checkpoints.cast_frozen_kernels(enc)
      if replicated_encoder:
        enc = vit_inference.inference_model(enc)
    ada = adapters.build_adapter(config.adapter.name, d,
                                 seed=int(config.seed), **ada_kwargs)
    return EncoderAdapter_(enc, ada)

  def load_frozen(abs_frozen, f_sh):
    """The encoder checkpoint, straight into its shardings."""
    target = nnx.to_pure_dict(abs_frozen)["encoder"]
    shard = nnx.to_pure_dict(f_sh)["encoder"]
    if replicated_encoder:
      enc, _ = checkpoints.load_model(config.encoder, dtype=enc_dtype,
                                      frozen=True)
      enc = vit_inference.inference_model(enc)
      vals = sh.place(sh.to_host(nnx.to_pure_dict(nnx.state(enc, nnx.Param))),
                      shard)
    else:
      vals = checkpoints.restore_params(config.encoder,
                                        sh.abstract_with(target, shard))
    frozen = jax.tree.map(lambda a: a, abs_frozen)
    nnx.replace_by_pure_dict(frozen, {"encoder": vals})
    return frozen

  lc = config.loss
  stochastic = config.adapter.name not in ("linear", "sc_linear", "mlp")

  def loss(model, batch, rng, step):
    del step
    if model.encoder is None:
      z = batch["x"]
    else:
      # Frozen: no gradient can flow into the encoder from the adapter loss.
      z = jax.lax.stop_gradient(
          model.encoder.patch_features(batch["pixels"]).astype(jnp.float32))
    logits = model.adapter(z, key=rng if stochastic else None)
    l, valid = losses.distill_loss(lc.name, logits, batch["y"], batch["mask"],
                                   pos_weight=lc.pos_weight, pi=lc.pi,
                                   beta=lc.beta)
    # A batch the loss skips (nnPU without P or U) makes no optimizer step.
    return l, {"skip_update": valid <= 0}

  pc = jax.process_count()
  if bsz % pc:
    raise ValueError(f"batch_size {bsz} is not divisible by the {pc} "
                     "processes")

  def batches():
    # This process's rows [p*L, (p+1)*L) of every global batch, read and
    # prepared in the pipeline (worker processes: config.data_workers).
    kw = dict(seed=int(config.seed), global_batch=bsz,
              num_epochs=int(config.epochs), flip=flip,
              num_workers=int(config.get("data_workers", 0) or 0),
              read_threads=max(1, int(config.data_threads)),
              pad_epochs=True)
    if e2e:
      return iter(data_lib.encoder_batches(streamed, rows, **kw))
    return iter(data_lib.feature_batches(streamed, rows, **kw))

  def export(model, res):
    adapter_dir = files_lib.join(workdir, "adapter")
    if config.mode == "features":
      size = src_meta.get("size") or src_meta.get("image_size")
      ws = src_meta.get("work_size")
    else:
      size, ws = config.size, config.work_size
    feats = {k: src_meta.get(k) for k in ("grid", "encoder", "architecture")
             if k in src_meta}
    if preprocess is not None and size:
      feats.update(pp.record(preprocess, size, ws))
    elif preprocess is not None:
      feats["preprocess"] = preprocess
    meta = {"training": {"config": config.to_dict(), "steps": total,
                         "final_loss": res.final_loss, "data": report,
                         "preprocess_from": origin},
            "features": feats}
    checkpoints.save_model(adapter_dir, model.adapter, _jsonable(meta),
                           overwrite=True)
    return adapter_dir

  enc_sha = None
  if e2e:
    enc_sha = hashlib.sha256(files_lib.read_bytes(
        files_lib.join(config.encoder, checkpoints.SIDECAR))).hexdigest()
  fp = trainer.config_fingerprint(
      config, dict(ids=ids, items=n_items, encoder_sha=enc_sha,
                   preprocess=preprocess,
                   prepared=getattr(items, "fingerprint", None)),
      volatile=trainer.VOLATILE_KEYS + _PATH_KEYS)
  task = trainer.Task(
      name="train-adapter", build=build, loss=loss, batches=batches,
      global_batch=bsz, device_keys=["pixels" if e2e else "x", "y", "mask"],
      trainable=nnx.All(nnx.Param, nnx.PathContains("adapter")),
      load_frozen=load_frozen if e2e else None, export=export,
      fingerprint=fp,
      jit_key=json.dumps(dict(
          adapter=config.adapter.to_dict(), d=d, grid=[gh, gw],
          loss=config.loss.to_dict(), mode=config.mode, seed=int(config.seed),
          encoder=enc_kwargs and {k: str(v) for k, v in enc_kwargs.items()},
          replicated_encoder=replicated_encoder), sort_keys=True,
                         default=str))
  res = trainer.fit(task, tc, workdir)
  params = nnx.to_pure_dict(res.params)["adapter"]
  opt_state = res.opt_state
  enc_state = None
  if e2e:
    enc_state = nnx.to_pure_dict(res.frozen)["encoder"]
  return TrainResult(workdir, res.step, total, res.final_loss, res.export,
                     params, opt_state, enc_state)


def _atomic_json(path: str, obj) -> None:
  files_lib.atomic_write_json(path, obj)


def _jsonable(obj):
  return json.loads(json.dumps(obj, default=str))
