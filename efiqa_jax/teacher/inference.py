"""The teacher at inference: FOV crops -> teacher input -> |f(x)| -> map.

The one home of the teacher's anomaly (EFIQA §1.4): `anomaly` is the only
function that computes |f(x)|, the magnitude of what the residual U-Net
fills in; `efiqa assess` (quality_model.TeacherQualityModel),
`efiqa pseudo-label`, the calibration (teacher/calibration.py) and
`efiqa benchmark` (through the quality model) all call it.

Teacher input (`teacher_input`), the way the trainer saw its maps
(teacher/data.py): the label-free vessel probability of the crop at the
teacher's load size (`data.load_size`, 256 for the default model), on the
8-bit grid with grey <= 50 set to 0 (the reference's cut-off), then resized
to the teacher's size with PIL's antialiased bilinear filter (`resize_u8`,
the trainer's resize, bit for bit). Cutting at the load size and not after
the resize matters: cut at 128 px, a real vessel map loses the faint rim
around every vessel that the teacher saw in training, and the teacher paints
it back everywhere (bench/README.md, "Default teacher").

Map (`pool`): a pixel is anomalous when |f(x)| > threshold; the map is, per
map cell, the share of anomalous FOV pixels in the window of `window` x
`window` map cells centred on it. The threshold and window are the teacher's calibration
(teacher/calibration.py), stored in its sidecar.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

GRAY_THRESHOLD = 50  # the reference: vessel-map grey <= 50 is set to 0
REFERENCE_THRESHOLD = 0.02  # the reference's pixel threshold on |f(x)|
MAP_SIZE = 64  # cells per side of the default model's degradation map


@dataclasses.dataclass(frozen=True)
class MapRule:
  """|f(x)| -> degradation map.

  threshold: pixel threshold on |f(x)|; window: side, in map cells (odd,
  centred), of the window around each map cell whose anomalous share is the
  cell's value; map_size: cells per side.
  """
  threshold: float
  window: int = 5
  map_size: int = MAP_SIZE

  def __post_init__(self):
    if not self.threshold > 0:
      raise ValueError(f"threshold must be > 0, got {self.threshold}")
    if self.window < 1 or self.window % 2 == 0 or self.map_size < 1:
      raise ValueError(f"window must be odd and >= 1, map_size >= 1; got "
                       f"{self.window}, {self.map_size}")


def input_sizes(meta: dict) -> tuple[int, int]:
  """(load size, teacher size) of a teacher from its sidecar: the trainer's
  `data.load_size` (maps cut there, then resized); a teacher without one
  (ported) is cut at its own size, as the reference's inference does."""
  t = int(meta.get("image_size", 256))
  load = ((meta.get("config") or {}).get("data") or {}).get("load_size")
  return int(load or t), t


@functools.lru_cache(maxsize=None)
def pil_bilinear_weights(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) int64 fixed-point weights of PIL's BILINEAR resize on
  8-bit images (Pillow's precompute_coeffs + normalize_coeffs_8bpc):
  antialiased (support scales with the reduction), 22 fractional bits."""
  scale = n_in / n_out
  fscale = max(scale, 1.0)
  support = 1.0 * fscale
  w = np.zeros((n_out, n_in), np.float64)
  for xx in range(n_out):
    center = (xx + 0.5) * scale
    xmin = max(int(center - support + 0.5), 0)
    xmax = min(int(center + support + 0.5), n_in)
    x = np.arange(xmin, xmax)
    k = np.maximum(0.0, 1.0 - np.abs((x - center + 0.5) / fscale))
    if k.sum() > 0:
      w[xx, xmin:xmax] = k / k.sum()
  bits = 22
  return np.where(w < 0, np.trunc(-0.5 + w * (1 << bits)),
                  np.trunc(0.5 + w * (1 << bits))).astype(np.int64)


def resize_u8(q, size: int):
  """(B, L, L) 8-bit values (any int/float dtype) -> (B, size, size) float32
  integers: PIL's `Image.resize((size, size), BILINEAR)` on each map, bit for
  bit (horizontal pass, rounding to 8 bits, then vertical)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  n = q.shape[-1]
  if n == size:
    return q.astype(jnp.float32)
  w = jnp.asarray(pil_bilinear_weights(n, size).astype(np.int32))
  half = 1 << 21

  def rnd(acc):
    return jnp.clip((acc + half) >> 22, 0, 255)

  x = q.astype(jnp.int32)
  x = rnd(jnp.einsum("bhw,ow->bho", x, w))  # horizontal
  x = rnd(jnp.einsum("bhw,oh->bow", x, w))  # vertical
  return x.astype(jnp.float32)


def teacher_input(images, fov, *, teacher_size: int,
                  load_size: int | None = None,
                  gray_threshold: int = GRAY_THRESHOLD):
  """FOV crops (B, S, S, 3) uint8 + (B, S, S) bool -> the teacher's input
  (B, T, T, 3) float32 in [0, 1], as the trainer made its maps."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from efiqa_jax import vessels  # pylint: disable=g-import-not-at-top
  load = int(load_size or teacher_size)
  v = vessels.vessel_map_for_teacher(images, fov, size=load)[..., 0]
  q = jnp.round(v * 255.0)
  q = jnp.where(q <= gray_threshold, 0.0, q)
  x = resize_u8(q, teacher_size) / 255.0
  return jnp.repeat(x[..., None], 3, axis=-1)


def residual(teacher, x):
  """f(x): what the teacher adds to its input (output = x + f(x))."""
  return teacher.body(x) if getattr(teacher, "residual", False) else (
      teacher(x) - x)


def anomaly(teacher, x):
  """|f(x)| averaged over channels, float32 (B, T, T): EFIQA's anomaly map
  (the reference's mean_c |x - model(x)|)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return jnp.mean(jnp.abs(residual(teacher, x).astype(jnp.float32)), axis=-1)


def fov_at_teacher(fov, teacher_size: int):
  """(B, S, S) bool -> (B, T, T) float32 {0, 1}: the FOV on the teacher grid."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  b = fov.shape[0]
  f = jax.image.resize(fov.astype(jnp.float32),
                       (b, teacher_size, teacher_size), "linear")
  return (f > 0.5).astype(jnp.float32)


def teacher_anomaly(teacher, images, fov, *, teacher_size: int,
                    load_size: int | None = None):
  """FOV crops -> (|f(x)| (B, T, T), FOV on the teacher grid (B, T, T))."""
  x = teacher_input(images, fov, teacher_size=teacher_size,
                    load_size=load_size)
  return anomaly(teacher, x), fov_at_teacher(fov, teacher_size)


def pool(anom, fov_t, rule: MapRule):
  """(B, T, T) |f(x)| + FOV -> (B, m, m) map: per map cell, the share of
  anomalous FOV pixels in the window of `rule.window` x `rule.window` map
  cells centred on it (0 where the window holds no FOV)."""
  return pool_share(anom, fov_t, rule.threshold, window=rule.window,
                    map_size=rule.map_size)


def pool_share(anom, fov_t, threshold, *, window: int, map_size: int):
  """`pool` with the threshold as a (possibly traced) value: one
  compilation serves a threshold sweep."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  b, t = anom.shape[0], anom.shape[1]
  m = map_size
  if t % m:
    raise ValueError(f"teacher size {t} is not a multiple of the map size {m}")
  f = t // m
  k = window
  hard = (anom > threshold).astype(jnp.float32) * fov_t

  def box(x):
    x = x.reshape(b, m, f, m, f).sum(axis=(2, 4))
    if k == 1:
      return x
    return jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, k, k), (1, 1, 1),
                                 "SAME")

  num, den = box(hard), box(fov_t)
  return jnp.where(den > 0, num / jnp.maximum(den, 1e-6), 0.0)


def photo_maps(teacher, images, fov, *, teacher_size: int, load_size: int,
               rule: MapRule):
  """FOV crops -> degradation maps (B, m, m); jit it (one photograph at a
  time inside the call on XLA:CPU, see xla_cpu.map_examples)."""
  from efiqa_jax import xla_cpu  # pylint: disable=g-import-not-at-top

  def one(images, fov):
    a, fov_t = teacher_anomaly(teacher, images, fov, teacher_size=teacher_size,
                               load_size=load_size)
    return pool(a, fov_t, rule)

  return xla_cpu.map_examples(one, images, fov)
