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
it back everywhere (bench/README.md, "Default teacher"). A teacher trained
with `data.min_component` > 0 also has, before the resize, the 8-connected
specks of fewer pixels removed (`remove_small_components`, the same function
on its training maps): sensor noise leaves such specks where it hid the
vessels, and a teacher inpaints only regions that are empty.

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


def min_component_of(meta: dict) -> int:
  """The speck size removed from a teacher's input at inference (pixels at
  the load size; 0: none), from its trainer's config: the larger of
  `data.min_component` (also removed in training) and
  `data.inference_min_component` (removed at inference only)."""
  d = (meta.get("config") or {}).get("data") or {}
  return max(int(d.get("min_component", 0) or 0),
             int(d.get("inference_min_component", 0) or 0))


def remove_small_components(maps, min_size: int) -> np.ndarray:
  """(..., L, L) vessel maps -> a copy with every 8-connected component of
  fewer than `min_size` non-zero pixels set to 0 (host, numpy/scipy)."""
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  out = np.array(maps, copy=True)
  if min_size <= 1 or out.size == 0:
    return out
  eight = np.ones((3, 3), bool)
  for m in out.reshape((-1,) + out.shape[-2:]):  # views: edits land in out
    lab, n = ndimage.label(m > 0, structure=eight)
    if n:
      small = np.bincount(lab.ravel()) < min_size
      small[0] = False
      m[small[lab]] = 0
  return out


def despeckle(q, min_size: int):
  """`remove_small_components` in jax (jit, any backend; equal to it, tested):
  labels spread as the 8-neighbour minimum for min_size - 1 steps, which
  covers any component of fewer than min_size pixels whole. A pixel goes
  when its label's group has fewer than min_size pixels and touches no
  pixel of another label (such a group is a whole component: a larger
  component's groups always touch each other)."""
  if min_size <= 1:
    return q
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  b, h, w = q.shape
  fg = q > 0
  big = jnp.int32(h * w)
  lab = jnp.where(fg, jnp.arange(h * w, dtype=jnp.int32).reshape(1, h, w),
                  big)

  def nbmin(l):  # 3x3 minimum, separable
    p = jnp.pad(l, ((0, 0), (0, 0), (1, 1)), constant_values=big)
    r = jnp.minimum(jnp.minimum(p[:, :, :-2], p[:, :, 1:-1]), p[:, :, 2:])
    p = jnp.pad(r, ((0, 0), (1, 1), (0, 0)), constant_values=big)
    return jnp.minimum(jnp.minimum(p[:, :-2], p[:, 1:-1]), p[:, 2:])

  lab = jax.lax.fori_loop(0, min_size - 1,
                          lambda _, l: jnp.where(fg, nbmin(l), big), lab)
  touches = (fg & (nbmin(lab) < lab)).reshape(b, -1)
  flat = lab.reshape(b, -1)

  def per_group(f, t):
    cnt = jnp.zeros(h * w + 1, jnp.int32).at[f].add(1)
    opn = jnp.zeros(h * w + 1, jnp.bool_).at[f].max(t)
    return cnt[f], opn[f]

  cnt, opn = jax.vmap(per_group)(flat, touches)
  small = ((cnt < min_size) & ~opn).reshape(b, h, w)
  return jnp.where(fg & small, jnp.zeros_like(q), q)


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
                  load_size: int | None = None, min_component: int = 0,
                  gray_threshold: int = GRAY_THRESHOLD):
  """FOV crops (B, S, S, 3) uint8 + (B, S, S) bool -> the teacher's input
  (B, T, T, 3) float32 in [0, 1], as the trainer made its maps."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from efiqa_jax import vessels  # pylint: disable=g-import-not-at-top
  load = int(load_size or teacher_size)
  v = vessels.vessel_map_for_teacher(images, fov, size=load)[..., 0]
  q = jnp.round(v * 255.0)
  q = jnp.where(q <= gray_threshold, 0.0, q)
  q = despeckle(q, min_component)
  x = resize_u8(q, teacher_size) / 255.0
  return jnp.repeat(x[..., None], 3, axis=-1)


def residual(teacher, x):
  """f(x): what the teacher adds to its input (output = x + f(x))."""
  return teacher.body(x) if getattr(teacher, "residual", False) else (
      teacher(x) - x)


def anomaly(teacher, x):
  """|f(x)| averaged over channels, float32 (B, T, T): EFIQA's anomaly map
  (the reference's mean_c |x - model(x)|)."""
  return anomaly_of_residual(residual(teacher, x))


def anomaly_of_residual(f):
  """The teacher's residual f(x) (B, T, T, C) -> |f(x)| averaged over
  channels (B, T, T) float32 (training panels have f(x) already)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return jnp.mean(jnp.abs(f.astype(jnp.float32)), axis=-1)


def fov_at_teacher(fov, teacher_size: int):
  """(B, S, S) bool -> (B, T, T) float32 {0, 1}: the FOV on the teacher grid."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  b = fov.shape[0]
  f = jax.image.resize(fov.astype(jnp.float32),
                       (b, teacher_size, teacher_size), "linear")
  return (f > 0.5).astype(jnp.float32)


def teacher_anomaly(teacher, images, fov, *, teacher_size: int,
                    load_size: int | None = None, min_component: int = 0):
  """FOV crops -> (|f(x)| (B, T, T), FOV on the teacher grid (B, T, T))."""
  x = teacher_input(images, fov, teacher_size=teacher_size,
                    load_size=load_size, min_component=min_component)
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
               rule: MapRule, min_component: int = 0):
  """FOV crops -> degradation maps (B, m, m); jit it (one photograph at a
  time inside the call on XLA:CPU, see xla_cpu.map_examples)."""
  from efiqa_jax.kernels import xla_cpu  # pylint: disable=g-import-not-at-top

  def one(images, fov):
    a, fov_t = teacher_anomaly(teacher, images, fov, teacher_size=teacher_size,
                               load_size=load_size,
                               min_component=min_component)
    return pool(a, fov_t, rule)

  return xla_cpu.map_examples(one, images, fov)
