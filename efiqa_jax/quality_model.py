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
  if name_or_path in ("default", "teacher"):
    path = DEFAULT_MODEL_DIR
    if not os.path.isdir(path):
      raise FileNotFoundError(
          f"the bundled default model is missing from {path}; reinstall "
          "efiqa-jax or pass --model PATH")
    return TeacherQualityModel.from_checkpoint(path, name="default", **kwargs)
  if os.path.isdir(name_or_path):
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
    model, meta = checkpoints.load_model(path)
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


def teacher_anomaly(teacher, images, fov, *, teacher_size):
  """Photograph crops -> (|f(x)| averaged over channels, FOV) at teacher size."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from efiqa_jax import vessels  # pylint: disable=g-import-not-at-top

  v = vessels.vessel_map_for_teacher(images, fov, size=teacher_size)
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
  teacher = nnx.merge(graphdef, state)
  anomaly, fov_t = teacher_anomaly(teacher, images, fov,
                                   teacher_size=teacher_size)
  return pool_anomaly(anomaly, fov_t, threshold=threshold, map_size=map_size)
