"""Quality models behind `efiqa assess`: load by name or path, predict maps.

A quality model turns FOV crops into degradation maps in [0, 1]:
  prepare(path) -> fundus.Prepared     (decode + FOV crop, never raises)
  predict(images uint8 (B,S,S,3), fov (B,S,S) bool) -> maps float32 (B,h,w)

The teacher model (the bundled default) is photograph -> label-free vessel map
-> VUAD teacher -> anomaly |f(x)| -> share of anomalous pixels around each map
cell. Inference runs on this process's local devices only (a local mesh): every
process works through its own slice without collectives, so uneven or resumed
slices can never hang a multi-host run.
"""
from __future__ import annotations

import functools
import os

import numpy as np

from efiqa_jax import quality as quality_lib

DEFAULT_MODEL_DIR = os.path.join(os.path.dirname(__file__), "assets",
                                 "teacher_default")
MAP_SIZE = 64


def load_quality_model(name_or_path: str = "default", **kwargs):
  """'default'/'teacher', a teacher directory, or 'student' (with
  encoder=DIR, adapter=DIR, optional calibration=FILE)."""
  if name_or_path == "student":
    if kwargs.get("map_filter") is None:
      kwargs.pop("map_filter", None)
    return StudentQualityModel.from_checkpoints(**kwargs)
  for k in ("encoder", "adapter", "calibration", "dtype", "map_filter"):
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
  if os.path.isdir(name_or_path):
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
  """Label-free vessels -> VUAD teacher -> degradation map."""

  def __init__(self, teacher, meta: dict, *, name: str | None = None,
               work_size: int = 512, batch_size: int = 8,
               threshold: float | None = None, grading=None):
    import jax  # pylint: disable=g-import-not-at-top
    from flax import nnx  # pylint: disable=g-import-not-at-top

    self.meta = dict(meta)
    self.name = name or self.meta.get("name", "teacher")
    self.work_size = int(self.meta.get("work_size", work_size))
    self.teacher_size = int(self.meta.get("image_size", 256))
    self.threshold = float(threshold if threshold is not None else
                           self.meta.get("anomaly_threshold", 0.02))
    self.grading = grading or quality_lib.Grading(
        **self.meta.get("grading", {}))
    self.batch_size = batch_size
    devices = jax.local_devices()
    # Batch must split evenly over local devices.
    n_dev = len(devices)
    self.batch_size = max(n_dev, -(-batch_size // n_dev) * n_dev)
    self._mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    self._data = jax.sharding.NamedSharding(
        self._mesh, jax.sharding.PartitionSpec("data"))
    self._graphdef, self._state = nnx.split(teacher)
    self._fn = jax.jit(functools.partial(
        _teacher_maps, threshold=self.threshold,
        teacher_size=self.teacher_size, map_size=MAP_SIZE),
                       static_argnums=(0,))

  @classmethod
  def from_checkpoint(cls, path: str, **kwargs):
    from efiqa_jax import checkpoints  # pylint: disable=g-import-not-at-top
    model, meta = checkpoints.load_model(path, kind="teacher")
    return cls(model, meta, **kwargs)

  def prepare(self, path):
    from efiqa_jax import fundus  # pylint: disable=g-import-not-at-top
    return fundus.prepare_fundus(path, size=self.work_size)

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
    return np.concatenate(out) if out else np.zeros((0, MAP_SIZE, MAP_SIZE),
                                                    np.float32)


GRAY_THRESHOLD = 50  # the reference: vessel-map grey <= 50 is set to 0


def teacher_input(images, fov, *, teacher_size, gray_threshold=GRAY_THRESHOLD):
  """Photograph crops -> the teacher's input, as the teacher was trained.

  Label-free vessel map at the teacher's size, on the 8-bit grid with grey <=
  50 set to 0 (the reference's inference convention, which the trainer also
  applies). The cut-off matters: it turns the faint residue of vessels a
  degraded photograph still shows into the empty regions the teacher learned
  to fill in.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from efiqa_jax import vessels  # pylint: disable=g-import-not-at-top
  v = vessels.vessel_map_for_teacher(images, fov, size=teacher_size)
  q = jnp.round(v * 255.0)
  return jnp.where(q <= gray_threshold, 0.0, q / 255.0)


def teacher_anomaly(teacher, images, fov, *, teacher_size):
  """Photograph crops -> (|f(x)| averaged over channels, FOV) at teacher size."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  v = teacher_input(images, fov, teacher_size=teacher_size)
  # |f(x)|: the residual branch directly when the teacher is x + f(x).
  f = teacher.body(v) if getattr(teacher, "residual", False) else teacher(v) - v
  anomaly = jnp.mean(jnp.abs(f.astype(jnp.float32)), axis=-1)
  b = images.shape[0]
  fov_t = jax.image.resize(fov.astype(jnp.float32),
                           (b, teacher_size, teacher_size), "linear")
  return anomaly, (fov_t > 0.5).astype(jnp.float32)


def pool_anomaly(anomaly, fov_t, *, threshold, map_size=MAP_SIZE):
  """Share of anomalous FOV pixels in a window of one reference cell (1/16 of
  the side) around each map cell: (B, T, T) -> (B, map_size, map_size)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  b, t = anomaly.shape[0], anomaly.shape[1]
  if t % map_size:
    raise ValueError(f"teacher size {t} is not a multiple of {map_size}")
  hard = (anomaly > threshold).astype(jnp.float32) * fov_t
  f = t // map_size
  k = max(1, (t // 16) // f)

  def box(x):
    x = x.reshape(b, map_size, f, map_size, f).sum(axis=(2, 4))
    return jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, k, k), (1, 1, 1),
                                 "SAME")

  num, den = box(hard), box(fov_t)
  return jnp.where(den > 0, num / jnp.maximum(den, 1e-6), 0.0)


def _teacher_maps(graphdef, state, images, fov, *, threshold, teacher_size,
                  map_size):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from efiqa_jax.kernels import xla_cpu  # pylint: disable=g-import-not-at-top
  teacher = nnx.merge(graphdef, state)

  def maps(images, fov):
    anomaly, fov_t = teacher_anomaly(teacher, images, fov,
                                     teacher_size=teacher_size)
    return pool_anomaly(anomaly, fov_t, threshold=threshold,
                        map_size=map_size)

  return xla_cpu.map_examples(maps, images, fov)


class StudentQualityModel:
  """Frozen ViT encoder + adapter (EFIQA stage 2): degradation logits per
  patch token.

  Input chain (the one `efiqa extract` uses, `features.PrepareEncoderInput`):
  FOV crop square (crop_x0, crop_y0, crop_size; zero outside the image and
  the FOV) at work_size -> EFIQA preprocessing (PIL bicubic to `size`, /255,
  ImageNet mean/std) -> encoder patch tokens (gh, gw, D) -> adapter logits.
  map = sigmoid(logits) on the adapter's grid, 0 on cells outside the FOV,
  then (map_filter="efiqa", the default) the paper's map post-processing,
  `quality.efiqa_map_filter`; map_filter="none" keeps the raw sigmoid.
  """

  def __init__(self, encoder, adapter, *, name: str = "student",
               size: int | None = None, work_size: int | None = None,
               batch_size: int = 8, grading=None, meta: dict | None = None,
               pooling=None, eyeq_head=None, map_filter: str = "efiqa"):
    import jax  # pylint: disable=g-import-not-at-top
    from flax import nnx  # pylint: disable=g-import-not-at-top

    if map_filter not in quality_lib.MAP_FILTERS:
      raise ValueError(f"map_filter must be one of {quality_lib.MAP_FILTERS},"
                       f" got {map_filter!r}")
    self.map_filter = map_filter
    self.meta = dict(meta or {}, map_filter=map_filter)
    self.pooling = pooling  # calibrate.WeightedPooling or None (default)
    self.name = name
    feats = self.meta.get("adapter", {}).get("features", {})
    self.size = int(size or feats.get("size") or 224)
    # Default: the chain the adapter was trained on (its features' metadata).
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
    devices = jax.local_devices()
    n_dev = len(devices)
    self.batch_size = max(n_dev, -(-batch_size // n_dev) * n_dev)
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    self._data = jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec("data"))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
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
    from efiqa_jax import checkpoints  # pylint: disable=g-import-not-at-top
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
      if not os.path.isabs(hp):  # relative to the calibration file
        hp = os.path.join(os.path.dirname(os.path.abspath(calibration)), hp)
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

  def prepare(self, path):
    from efiqa_jax import fundus  # pylint: disable=g-import-not-at-top
    return fundus.prepare_fundus(path, size=self.work_size)

  def encoder_input(self, images: np.ndarray) -> np.ndarray:
    from efiqa_jax.encoders import preprocess as pp  # pylint: disable=g-import-not-at-top
    return np.stack([pp.preprocess(np.asarray(im), self.size, "efiqa")
                     for im in images]).astype(np.float32)

  def _run(self, images: np.ndarray):
    import jax  # pylint: disable=g-import-not-at-top
    logits, probs = [], []
    for s in range(0, images.shape[0], self.batch_size):
      x = self.encoder_input(images[s:s + self.batch_size])
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

  def predict_logits(self, images: np.ndarray, fov: np.ndarray | None = None
                     ) -> np.ndarray:
    """uint8 FOV crops (B, S, S, 3) -> raw adapter logits (B, gh, gw)."""
    del fov  # the crop is already zero outside the FOV
    return self._run(images)[0]

  def predict_all(self, images: np.ndarray, fov: np.ndarray) -> dict:
    """{logits, maps, class_probs (B, 3) or None} from one encoder pass."""
    logits, probs = self._run(images)
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
