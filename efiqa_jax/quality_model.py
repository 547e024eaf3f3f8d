"""Quality models behind `efiqa assess`: load by name or path, predict maps.

A quality model (`QualityModel`, implemented by the teacher and the student)
turns FOV crops into degradation maps in [0, 1]:
  prepare(path) -> fundus.Prepared     (decode + FOV crop, never raises)
  predict(images uint8 (B,S,S,3), fov (B,S,S) bool) -> maps float32 (B,h,w)

The teacher model (the bundled default) is photograph -> label-free vessel map
-> VUAD teacher -> anomaly |f(x)| -> share of anomalous pixels around each map
cell (efiqa_jax.teacher.inference). Inference runs on this process's local devices only (a local mesh): every
process works through its own slice without collectives, so uneven or resumed
slices can never hang a multi-host run.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Protocol, runtime_checkable

import numpy as np

from efiqa_jax import quality as quality_lib
from efiqa_jax.teacher import inference

DEFAULT_MODEL_DIR = os.path.join(os.path.dirname(__file__), "assets",
                                 "teacher_default")
MAP_SIZE = inference.MAP_SIZE


@runtime_checkable
class QualityModel(Protocol):
  """What `assess` needs of a quality model (`TeacherQualityModel`,
  `StudentQualityModel`)."""

  name: str
  work_size: int            # side of the square the maps and overlays cover
  grading: quality_lib.Grading
  meta: dict                # recorded in the run fingerprint
  has_logits: bool          # `predict_all` returns logits (--save-logits)

  def prepare(self, path) -> Any:
    """path -> fundus.Prepared on the model's frame; never raises."""

  def assess_prepare(self) -> Any:
    """The grain transform `assess` reads photographs with, or None for
    `sources.PrepareFundus(work_size)`."""

  def preprocess_note(self) -> str | None:
    """One line on what the model reads, for the log; None: nothing to say."""

  def predict(self, images: np.ndarray, fov: np.ndarray) -> np.ndarray:
    """uint8 (B, S, S, 3), bool (B, S, S) -> maps float32 (B, h, w)."""

  def predict_all(self, images: np.ndarray, fov: np.ndarray,
                  encoder_images: np.ndarray | None = None) -> dict:
    """{maps, logits (None without), class_probs (B, 3) or None} of one
    pass; `encoder_images` are what `assess_prepare` adds, if anything."""

  def summarise(self, qmap: np.ndarray,
                fov_weight: np.ndarray) -> tuple[float, float]:
    """(quality, degraded_fraction) of one map."""


def load_quality_model(name_or_path: str = "default", **kwargs
                       ) -> QualityModel:
  """'default'/'teacher', a teacher directory, or 'student' (with
  encoder=DIR, adapter=DIR, optional calibration=FILE)."""
  if name_or_path == "student":
    for k in ("map_filter", "preprocess"):
      if kwargs.get(k) is None:
        kwargs.pop(k, None)
    return StudentQualityModel.from_checkpoints(**kwargs)
  for k in ("encoder", "adapter", "calibration", "dtype", "map_filter",
            "preprocess"):
    if kwargs.get(k) is not None:
      raise ValueError(f"--{k} is only for --model student")
    kwargs.pop(k, None)
  if name_or_path in ("default", "teacher"):
    path = DEFAULT_MODEL_DIR
    if not os.path.isdir(path):
      raise FileNotFoundError(
          f"the bundled default model is missing from {path}; reinstall "
          "efiqa-jax or pass --model PATH")
    return TeacherQualityModel.from_checkpoint(path, name="default", **kwargs)
  from efiqa_jax import files  # pylint: disable=g-import-not-at-top
  if files.isdir(name_or_path):
    from efiqa_jax import checkpoints  # pylint: disable=g-import-not-at-top
    try:
      checkpoints.check_kind(name_or_path, "teacher")
    except ValueError as e:
      raise ValueError(f"{e} (a student is --model student --encoder DIR "
                       "--adapter DIR)") from None
    return TeacherQualityModel.from_checkpoint(name_or_path, **kwargs)
  raise FileNotFoundError(
      f"unknown model {name_or_path!r}: give 'default' or a teacher export "
      "directory (efiqa train-teacher writes WORKDIR/export)")


class TeacherQualityModel:
  """Label-free vessels -> VUAD teacher -> degradation map
  (efiqa_jax.teacher.inference: input, |f(x)| and the map rule)."""

  has_logits = False  # the map is a share of anomalous pixels, not a sigmoid

  def __init__(self, teacher, meta: dict, *, name: str | None = None,
               work_size: int = 512, batch_size: int = 8,
               threshold: float | None = None, grading=None, mesh=None):
    """mesh: a mesh of this process's devices (default
    `sharding.local_mesh()`); the batch splits over its `data` axis."""
    import jax  # pylint: disable=g-import-not-at-top
    from flax import nnx  # pylint: disable=g-import-not-at-top
    from efiqa_jax import sharding as sh  # pylint: disable=g-import-not-at-top

    self.meta = dict(meta)
    self.name = name or self.meta.get("name", "teacher")
    self.work_size = int(self.meta.get("work_size", work_size))
    self.load_size, self.teacher_size = inference.input_sizes(self.meta)
    self.min_component = inference.min_component_of(self.meta)
    self.rule = map_rule(self.meta, threshold=threshold)
    self.threshold = self.rule.threshold
    self.grading = grading or quality_lib.Grading(
        **self.meta.get("grading", {}))
    self._mesh = sh.local_mesh(mesh)
    self._data = sh.data_sharding(self._mesh)
    # Batch must split evenly over the local devices.
    n_dev = sh.batch_shards(self._data)
    self.batch_size = max(n_dev, -(-batch_size // n_dev) * n_dev)
    self._graphdef, self._state = nnx.split(teacher)
    self._fn = jax.jit(functools.partial(
        _teacher_maps, teacher_size=self.teacher_size,
        load_size=self.load_size, rule=self.rule,
        min_component=self.min_component), static_argnums=(0,))

  @classmethod
  def from_checkpoint(cls, path: str, **kwargs):
    from efiqa_jax import checkpoints  # pylint: disable=g-import-not-at-top
    model, meta = checkpoints.load_model(path, kind="teacher")
    return cls(model, meta, **kwargs)

  @property
  def teacher(self):
    from flax import nnx  # pylint: disable=g-import-not-at-top
    return nnx.merge(self._graphdef, self._state)

  def prepare(self, path):
    from efiqa_jax import fundus  # pylint: disable=g-import-not-at-top
    return fundus.prepare_fundus(path, size=self.work_size)

  def assess_prepare(self):
    return None  # assess's own FOV crop at work_size

  def preprocess_note(self) -> str | None:
    return None

  def summarise(self, qmap, fov_weight):
    return quality_lib.summarise(qmap, fov_weight)

  def predict_all(self, images: np.ndarray, fov: np.ndarray,
                  encoder_images: np.ndarray | None = None) -> dict:
    del encoder_images  # the teacher reads the crop only
    return {"maps": self.predict(images, fov), "logits": None,
            "class_probs": None}

  def predict(self, images: np.ndarray, fov: np.ndarray) -> np.ndarray:
    import jax  # pylint: disable=g-import-not-at-top
    n = images.shape[0]
    out = []
    for s in range(0, n, self.batch_size):
      im = images[s:s + self.batch_size]
      fm = fov[s:s + self.batch_size]
      k = im.shape[0]
      if k < self.batch_size:  # pad to the static batch; padded rows dropped
        pad = self.batch_size - k
        im = np.concatenate([im, np.zeros((pad,) + im.shape[1:], im.dtype)])
        fm = np.concatenate([fm, np.zeros((pad,) + fm.shape[1:], fm.dtype)])
      im = jax.device_put(im, self._data)
      fm = jax.device_put(fm, self._data)
      maps = self._fn(self._graphdef, self._state, im, fm)
      out.append(np.asarray(maps)[:k])
    m = self.rule.map_size
    return np.concatenate(out) if out else np.zeros((0, m, m), np.float32)


def map_rule(meta: dict, *, threshold: float | None = None
             ) -> "inference.MapRule":
  """A teacher's map rule from its sidecar: `map` (threshold, window,
  map_size) as its calibration wrote it; else the older `anomaly_threshold`
  (else the reference's 0.02) with the odd window nearest one reference
  cell (1/16 of the side). `threshold` overrides."""
  rule = dict(meta.get("map") or {})
  rule.setdefault("threshold", meta.get("anomaly_threshold",
                                        inference.REFERENCE_THRESHOLD))
  rule.setdefault("window", (MAP_SIZE // 16) | 1)
  if threshold is not None:
    rule["threshold"] = threshold
  return inference.MapRule(threshold=float(rule["threshold"]),
                           window=int(rule["window"]),
                           map_size=int(rule.get("map_size", MAP_SIZE)))


def _teacher_maps(graphdef, state, images, fov, *, teacher_size, load_size,
                  rule, min_component=0):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  return inference.photo_maps(nnx.merge(graphdef, state), images, fov,
                              teacher_size=teacher_size, load_size=load_size,
                              rule=rule, min_component=min_component)


class StudentQualityModel:
  """Frozen ViT encoder + adapter (EFIQA stage 2): degradation logits per
  patch token.

  Input chain (`preprocess`, `encoders.preprocess.PREPROCESS`; by default
  what the adapter records, `recorded_preprocess`):
    efiqa  the official path: the whole photograph at full resolution, PIL
           bicubic to `size`, /255, ImageNet mean/std (EFIQA extract_dino.py,
           the HF demo). Map, FOV mask and overlay are on the photograph
           frame: the whole photograph resized to a square (aspect not
           kept), `encoders.preprocess.prepare_photograph`;
    fov    the FOV crop square (crop_x0, crop_y0, crop_size; zero outside
           the image and the FOV) at work_size, then the same resize and
           normalisation (`encoders.extract.PrepareEncoderInput`); map and overlay
           cover the crop square.
  -> encoder patch tokens (gh, gw, D) -> adapter logits. map =
  sigmoid(logits) on the adapter's grid, 0 on cells outside the FOV, then
  (map_filter="efiqa", the default) the paper's map post-processing,
  `quality.efiqa_map_filter`; map_filter="none" keeps the raw sigmoid.
  """

  has_logits = True

  def __init__(self, encoder, adapter, *, name: str = "student",
               size: int | None = None, work_size: int | None = None,
               batch_size: int = 8, grading=None, meta: dict | None = None,
               pooling=None, eyeq_head=None, map_filter: str = "efiqa",
               preprocess: str | None = None, mesh=None):
    import jax  # pylint: disable=g-import-not-at-top
    from flax import nnx  # pylint: disable=g-import-not-at-top
    from efiqa_jax import sharding as sh  # pylint: disable=g-import-not-at-top
    from efiqa_jax.encoders import preprocess as pp  # pylint: disable=g-import-not-at-top

    if map_filter not in quality_lib.MAP_FILTERS:
      raise ValueError(f"map_filter must be one of {quality_lib.MAP_FILTERS},"
                       f" got {map_filter!r}")
    self.map_filter = map_filter
    self.meta = dict(meta or {}, map_filter=map_filter)
    self.pooling = pooling  # calibrate.WeightedPooling or None (default)
    self.name = name
    feats = self.meta.get("adapter", {}).get("features") or {}
    # Default: the chain the adapter was trained on (its sidecar's record).
    self.preprocess_recorded = pp.recorded_preprocess(
        self.meta.get("adapter", {}))
    self.preprocess = pp.check_preprocess(
        preprocess or self.preprocess_recorded or pp.DEFAULT_PREPROCESS)
    self.meta["preprocess"] = self.preprocess
    self.size = int(size or feats.get("size") or 224)
    # fov: the crop side; efiqa: the side of the photograph's square view
    # (maps' FOV weights, overlays), the encoder input never passes by it.
    self.work_size = int(work_size or feats.get("work_size") or 512)
    p = encoder.cfg["patch_size"]
    if self.size % p:
      raise ValueError(f"size {self.size} is not a multiple of the encoder "
                       f"patch size {p}")
    if adapter.in_dim != encoder.cfg["hidden_size"]:
      raise ValueError(f"adapter expects D={adapter.in_dim}, the encoder "
                       f"gives {encoder.cfg['hidden_size']}")
    self.grid = adapter.output_grid(self.size // p, self.size // p)
    self.grading = grading or quality_lib.Grading()
    self._mesh = sh.local_mesh(mesh)
    self._data = sh.data_sharding(self._mesh)
    rep = sh.replicated(self._mesh)
    n_dev = sh.batch_shards(self._data)
    self.batch_size = max(n_dev, -(-batch_size // n_dev) * n_dev)
    self._enc = nnx.split(encoder)
    self._ada = nnx.split(adapter)
    self._enc = (self._enc[0], jax.device_put(self._enc[1], rep))
    self._ada = (self._ada[0], jax.device_put(self._ada[1], rep))
    # Graphdefs closed over (the ViT's config dict makes them unhashable).
    gd_e, gd_a = self._enc[0], self._ada[0]
    self._fn = jax.jit(lambda es, as_, x: _student_logits(gd_e, es, gd_a,
                                                          as_, x))
    self._head = None
    if eyeq_head is not None:  # option 2: class probabilities, same pass
      gd_h, st_h = nnx.split(eyeq_head)
      self._head = jax.device_put(st_h, rep)
      self._fn = jax.jit(lambda es, as_, hs, x: _student_logits(
          gd_e, es, gd_a, as_, x, gd_h, hs))

  @classmethod
  def from_checkpoints(cls, encoder: str | None = None,
                       adapter: str | None = None,
                       calibration: str | None = None, *,
                       dtype: str | None = None, **kwargs):
    """kwargs go to the constructor (preprocess=None: the adapter's)."""
    from efiqa_jax import checkpoints  # pylint: disable=g-import-not-at-top
    from efiqa_jax import files  # pylint: disable=g-import-not-at-top
    from efiqa_jax.models import adapters  # pylint: disable=g-import-not-at-top
    if not encoder or not adapter:
      raise ValueError("--model student needs --encoder DIR and --adapter DIR")
    checkpoints.check_kind(encoder, "encoder")  # both before loading either
    checkpoints.check_kind(adapter, "adapter")
    enc, enc_meta = checkpoints.load_model(encoder, dtype=dtype,
                                           frozen=True, kind="encoder")
    if getattr(enc, "ARCH", None) != "vit":
      raise ValueError(f"{encoder} is not a ViT encoder")
    from efiqa_jax.kernels import vit_inference  # pylint: disable=g-import-not-at-top
    enc = vit_inference.inference_model(enc)  # replicated and only run
    ada, ada_meta = checkpoints.load_model(adapter, kind="adapter")
    if not adapters.is_adapter_architecture(ada_meta["architecture"]):
      raise ValueError(f"{adapter} holds a {ada_meta['architecture']!r} "
                       "model, not an adapter")
    meta = {"encoder": enc_meta, "adapter": ada_meta}
    grading = kwargs.pop("grading", None)
    pooling = None
    if calibration:
      from efiqa_jax import calibrate  # pylint: disable=g-import-not-at-top
      cal = calibrate.load_calibration(calibration)
      meta["calibration"] = cal
      pooling = calibrate.pooling_from(cal)
      if "grading" in cal:
        grading = quality_lib.Grading(**cal["grading"])
    head = None
    if calibration and cal.get("eyeq_head"):
      hp = cal["eyeq_head"]
      if not (os.path.isabs(hp) or files.is_remote(hp)):
        # relative to the calibration file
        hp = files.join(files.abs_path(calibration).parent, hp)
      head, head_meta = checkpoints.load_model(hp, architecture="eyeq_head")
      meta["eyeq_head"] = head_meta
      if head.in_dim != enc.cfg["hidden_size"]:
        raise ValueError(f"EyeQ head expects D={head.in_dim}, the encoder "
                         f"gives {enc.cfg['hidden_size']}")
    model = cls(enc, ada, grading=grading, meta=meta, pooling=pooling,
                eyeq_head=head, **kwargs)
    if pooling is not None and pooling.weights.shape != tuple(model.grid):
      raise ValueError(f"calibration weights {pooling.weights.shape} do not "
                       f"match the student's map grid {tuple(model.grid)}")
    return model

  def summarise(self, qmap, fov_weight):
    """(quality, degraded_fraction): calibrated pooling or the default."""
    if self.pooling is None:
      return quality_lib.summarise(qmap, fov_weight)
    return self.pooling.summarise(qmap, fov_weight)

  def preprocess_note(self) -> str:
    """One line: the preprocessing used and where it came from."""
    rec = self.preprocess_recorded
    if rec is None:
      return (f"student preprocessing {self.preprocess} (the adapter records "
              "none)")
    if rec == self.preprocess:
      return f"student preprocessing {self.preprocess} (the adapter's record)"
    return (f"warning: student preprocessing {self.preprocess}, but the "
            f"adapter was trained on {rec} inputs")

  def prepare(self, path):
    """fov: `fundus.prepare_fundus` at work_size; efiqa: the photograph
    frame (`encoders.preprocess.prepare_photograph`)."""
    if self.preprocess == "efiqa":
      from efiqa_jax.encoders import preprocess as pp  # pylint: disable=g-import-not-at-top
      return pp.prepare_photograph(path, self.size, self.work_size)[0]
    from efiqa_jax import fundus  # pylint: disable=g-import-not-at-top
    return fundus.prepare_fundus(path, size=self.work_size)

  def assess_prepare(self):
    """The grain transform `assess` reads photographs with: None (assess's
    own FOV crop) for fov; `PhotographPrepare` for efiqa."""
    if self.preprocess == "efiqa":
      return PhotographPrepare(self.size, self.work_size)
    return None

  def encoder_input(self, images: np.ndarray,
                    encoder_images: np.ndarray | None = None) -> np.ndarray:
    """uint8 images -> normalised (B, size, size, 3). `encoder_images`
    ((B, size, size, 3), `prepare_photograph`'s full-resolution resize) take
    the place of `images` when given: then only the normalisation runs."""
    from efiqa_jax.encoders import preprocess as pp  # pylint: disable=g-import-not-at-top
    src = images if encoder_images is None else encoder_images
    return np.stack([pp.preprocess(np.asarray(im), self.size, "efiqa")
                     for im in src]).astype(np.float32)

  def _run(self, images: np.ndarray, encoder_images=None):
    import jax  # pylint: disable=g-import-not-at-top
    logits, probs = [], []
    for s in range(0, images.shape[0], self.batch_size):
      x = self.encoder_input(
          images[s:s + self.batch_size], None if encoder_images is None
          else encoder_images[s:s + self.batch_size])
      k = x.shape[0]
      if k < self.batch_size:
        x = np.concatenate([x, np.zeros((self.batch_size - k,) + x.shape[1:],
                                        x.dtype)])
      x = jax.device_put(x, self._data)
      if self._head is None:
        lg = self._fn(self._enc[1], self._ada[1], x)
      else:
        lg, pr = self._fn(self._enc[1], self._ada[1], self._head, x)
        probs.append(np.asarray(pr)[:k])
      logits.append(np.asarray(lg)[:k])
    lg = (np.concatenate(logits) if logits else
          np.zeros((0,) + tuple(self.grid), np.float32))
    return lg, (np.concatenate(probs) if probs else None)

  def predict_logits(self, images: np.ndarray, fov: np.ndarray | None = None,
                     encoder_images: np.ndarray | None = None) -> np.ndarray:
    """uint8 (B, S, S, 3) -> raw adapter logits (B, gh, gw). images: FOV
    crops (fov) or photograph squares (efiqa; resized again to `size`
    unless the exact `encoder_images` come with them)."""
    del fov  # the crop is already zero outside the FOV
    return self._run(images, encoder_images)[0]

  def predict_all(self, images: np.ndarray, fov: np.ndarray,
                  encoder_images: np.ndarray | None = None) -> dict:
    """{logits, maps, class_probs (B, 3) or None} from one encoder pass."""
    logits, probs = self._run(images, encoder_images)
    return {"logits": logits, "maps": self.maps_from_logits(logits, fov),
            "class_probs": probs}

  def maps_from_logits(self, logits: np.ndarray, fov: np.ndarray
                       ) -> np.ndarray:
    maps = 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))
    for i in range(maps.shape[0]):
      valid = quality_lib.fov_at(fov[i], maps.shape[1:]) > 0
      maps[i][~valid] = 0.0
      if self.map_filter == "efiqa":
        maps[i] = quality_lib.efiqa_map_filter(maps[i], None, valid=valid)
    return maps.astype(np.float32)

  def predict(self, images: np.ndarray, fov: np.ndarray) -> np.ndarray:
    return self.maps_from_logits(self.predict_logits(images, fov), fov)


class PhotographPrepare:
  """`assess`'s grain transform for the student's `efiqa` preprocessing:
  path -> row on the photograph frame (`prepare_photograph`): image and
  fov_mask (work_size square view of the whole photograph), fov,
  encoder_image (size, size, 3) uint8, crop [-1, -1, -1, orig_h, orig_w]
  (no crop square)."""

  def __init__(self, size: int, work_size: int):
    self.size, self.work_size = int(size), int(work_size)

  def blank(self, status: str, message: str = "", path: str = "") -> dict:
    from efiqa_jax import sources  # pylint: disable=g-import-not-at-top
    row = sources.blank_row(self.work_size, status, message, path)
    row["encoder_image"] = np.zeros((self.size, self.size, 3), np.uint8)
    return row

  def map(self, element):
    from efiqa_jax.encoders import preprocess as pp  # pylint: disable=g-import-not-at-top
    from efiqa_jax import sources  # pylint: disable=g-import-not-at-top
    p, enc = pp.prepare_photograph(sources.record_source(element), self.size,
                                   self.work_size)
    row = self.blank(p.status, p.message or "", element["path"])
    row["crop"] = np.array([-1, -1, -1, p.orig_h, p.orig_w], np.int32)
    if p.fov is not None:
      row["fov"] = np.array([p.fov.cx, p.fov.cy, p.fov.r], np.float32)
    if p.ok:
      row.update(image=np.asarray(p.image, np.uint8),
                 fov_mask=np.asarray(p.fov_mask, bool), encoder_image=enc,
                 ok=np.bool_(True))
    return row


def _student_logits(enc_graphdef, enc_state, ada_graphdef, ada_state, x,
                    head_graphdef=None, head_state=None):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  enc = nnx.merge(enc_graphdef, enc_state)
  ada = nnx.merge(ada_graphdef, ada_state)
  z = enc.patch_features(x).astype(jnp.float32)
  if head_graphdef is None:
    return ada(z)
  image_logits, _ = nnx.merge(head_graphdef, head_state)(z)
  return ada(z), jax.nn.softmax(image_logits, -1)
