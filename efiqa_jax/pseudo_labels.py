"""Teacher anomaly maps -> patch pseudo-labels (EFIQA stage 1 -> stage 2).

The reference (`vuad/infer.py`) does, per vessel map:
  1. read the map (3 channels), zero pixels whose grey value is <= 50, resize to
     256x256 (OpenCV INTER_LINEAR), scale to [0, 1];
  2. y = model(x); anomaly A = mean_c |x - y| = mean_c |f(x)|;
  3. pixel threshold 0.02: hard A > 0.02, or soft clip((A - 0.02) / 0.02, 0, 1);
  4. split into a grid x grid set of cells; a cell is bad (255) when >= 90 % of
     its pixels are anomalous (soft mode: the cell's mean).
Everything here is that, batched; `anomaly` runs inside jit.
"""
from __future__ import annotations

import dataclasses
import functools
import os

import numpy as np

DEFAULT_THRESHOLD = 0.02
DEFAULT_RELAX = 0.9
REFERENCE_GREY_CUTOFF = 50


@dataclasses.dataclass(frozen=True)
class LabelSpec:
  threshold: float = DEFAULT_THRESHOLD
  grid: int = 16          # 16 for 256/16 tokens; 14 for 224/16 (the paper's ViT)
  relax: float = DEFAULT_RELAX
  mode: str = "hard"      # or "soft"

  def __post_init__(self):
    if self.mode not in ("hard", "soft"):
      raise ValueError(f"mode must be 'hard' or 'soft', got {self.mode!r}")
    if not 0.0 < self.relax <= 1.0:
      raise ValueError(f"relax must be in (0, 1], got {self.relax}")
    if self.grid < 1:
      raise ValueError(f"grid must be >= 1, got {self.grid}")


def teacher_label_spec(teacher: str, grid: int, *,
                       threshold: float | None = None,
                       relax: float | None = None,
                       mode: str = "hard") -> tuple[LabelSpec, str]:
  """The pseudo-label rule for `teacher`: explicit values win; else the rule
  `efiqa calibrate-teacher` measured for it (sidecar `pseudo_labels`: pixel
  threshold and cell share on erased vessel maps, no quality label); else
  the reference's 0.02 / 0.9, which assume R2-V2 maps and a base-64 teacher.
  Returns (spec, where each value came from)."""
  from efiqa_jax import checkpoints  # pylint: disable=g-import-not-at-top
  rule = checkpoints.check_kind(teacher, "teacher").get("pseudo_labels") or {}
  src = []

  def pick(name, given, ref):
    if given is not None:
      src.append(f"{name} given")
      return float(given)
    if name in rule:
      src.append(f"{name} calibrated")
      return float(rule[name])
    src.append(f"{name} reference")
    return ref

  spec = LabelSpec(threshold=pick("threshold", threshold, DEFAULT_THRESHOLD),
                   grid=int(grid),
                   relax=pick("relax", relax, DEFAULT_RELAX), mode=mode)
  return spec, ", ".join(src)


def pixel_anomaly(anomaly, threshold: float = DEFAULT_THRESHOLD,
                  mode: str = "hard"):
  """Per-pixel anomaly in {0,1} (hard) or [0,1] (soft); numpy or jax arrays."""
  xp = _xp(anomaly)
  if mode == "hard":
    return (anomaly > threshold).astype(xp.float32)
  return xp.clip((anomaly - threshold) / threshold, 0.0, 1.0).astype(xp.float32)


def cell_bounds(size: int, grid: int) -> np.ndarray:
  """Cell edges along one axis. Cells are equal when grid divides size; else
  edges are rounded like a nearest split so every pixel belongs to one cell."""
  return np.round(np.linspace(0, size, grid + 1)).astype(np.int64)


def patch_labels(anomaly: np.ndarray, spec: LabelSpec = LabelSpec()
                 ) -> np.ndarray:
  """(H, W) anomaly -> (grid, grid) uint8 labels (0/255 hard, 0..255 soft)."""
  anomaly = np.asarray(anomaly, np.float32)
  if anomaly.ndim != 2:
    raise ValueError(f"anomaly must be 2-D, got shape {anomaly.shape}")
  pix = pixel_anomaly(anomaly, spec.threshold, spec.mode)
  frac = cell_means(pix, spec.grid)
  if spec.mode == "hard":
    # >= relax with a small tolerance for float rounding of the fraction.
    return np.where(frac >= spec.relax - 1e-6, 255, 0).astype(np.uint8)
  return np.round(frac * 255.0).astype(np.uint8)


def cell_means(x: np.ndarray, grid: int) -> np.ndarray:
  """Mean of x over a grid x grid partition of its (H, W)."""
  h, w = x.shape
  ys, xs = cell_bounds(h, grid), cell_bounds(w, grid)
  if h % grid == 0 and w % grid == 0:
    return x.reshape(grid, h // grid, grid, w // grid).mean(axis=(1, 3))
  out = np.zeros((grid, grid), np.float32)
  for i in range(grid):
    for j in range(grid):
      out[i, j] = x[ys[i]:ys[i + 1], xs[j]:xs[j + 1]].mean()
  return out


def _xp(a):
  if isinstance(a, np.ndarray) or np.isscalar(a):
    return np
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return jnp


def reference_vessel_input(rgb: np.ndarray, size: int = 256) -> np.ndarray:
  """A vessel-map image (H, W, 3|1) uint8 -> the reference's teacher input.

  Grey <= 50 is zeroed (OpenCV BGR2GRAY weights), then a bilinear resize without
  antialiasing (OpenCV INTER_LINEAR semantics), then /255. Returns (size, size, 3)
  float32 in [0, 1].
  """
  a = np.asarray(rgb)
  if a.ndim == 2:
    a = np.repeat(a[..., None], 3, axis=-1)
  if a.shape[-1] == 4:
    a = a[..., :3]
  if a.shape[-1] == 1:
    a = np.repeat(a, 3, axis=-1)
  if a.dtype != np.uint8:
    raise ValueError(f"vessel maps must be 8-bit, got {a.dtype}")
  r, g, b = (a[..., c].astype(np.float32) for c in range(3))
  grey = np.round(0.299 * r + 0.587 * g + 0.114 * b)
  a = np.where((grey <= REFERENCE_GREY_CUTOFF)[..., None], 0, a)
  out = resize_linear(a.astype(np.float32), size, size)
  # OpenCV rounds back to uint8 before ToTensor.
  return np.clip(np.round(out), 0, 255).astype(np.float32) / 255.0


def resize_linear(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """Bilinear resize with half-pixel centres and no antialiasing (cv2 style)."""
  h, w = img.shape[:2]
  if (h, w) == (out_h, out_w):
    return img.copy()

  def coords(n_in, n_out):
    x = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    x = np.clip(x, 0, n_in - 1)
    x0 = np.floor(x).astype(np.int64)
    x1 = np.minimum(x0 + 1, n_in - 1)
    return x0, x1, (x - x0).astype(np.float32)

  y0, y1, fy = coords(h, out_h)
  x0, x1, fx = coords(w, out_w)
  fy = fy.reshape(-1, 1, *([1] * (img.ndim - 2)))
  fx = fx.reshape(1, -1, *([1] * (img.ndim - 2)))
  top = img[y0][:, x0] * (1 - fx) + img[y0][:, x1] * fx
  bot = img[y1][:, x0] * (1 - fx) + img[y1][:, x1] * fx
  return top * (1 - fy) + bot * fy


def write_pseudo_labels(inputs, teacher: str, out_dir: str, *,
                        from_photos: bool = False, spec: LabelSpec = LabelSpec(),
                        batch_size: int = 8, work_size: int = 512,
                        progress: bool = True) -> dict:
  """`efiqa pseudo-label`: anomaly maps and patch labels for every input.

  Writes DIR/anomaly/<id>.npy (float32 mean_c |f(x)| at the teacher's
  resolution), DIR/labels/<id>.png (grid x grid uint8) and DIR/manifest.csv
  (image, id, status, message) with a row for every input, failures included.
  Inputs are vessel-map images (the reference's convention) or, with
  from_photos, photographs whose label-free vessel maps are computed first.
  Re-running into the same folder with the same rule resumes (inputs with
  both files are kept); another rule is an error. Returns counts {'total',
  'ok', 'failed'}.
  """
  import csv  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top

  from efiqa_jax import checkpoints, sources  # pylint: disable=g-import-not-at-top

  if isinstance(inputs, str):
    inputs = [inputs]
  paths = sources.list_inputs(list(inputs))
  ids = sources.unique_ids(paths)
  model, meta = checkpoints.load_model(teacher, kind="teacher")
  size = int(meta.get("image_size", 256))
  graphdef, state = nnx.split(model)

  @jax.jit
  def anomaly_fn(state, x):
    m = nnx.merge(graphdef, state)
    return jnp.mean(jnp.abs(m(x) - x), axis=-1)

  if from_photos:
    from efiqa_jax import fundus  # pylint: disable=g-import-not-at-top
    from efiqa_jax import quality_model  # pylint: disable=g-import-not-at-top
    vessel_fn = jax.jit(functools.partial(quality_model.teacher_input,
                                          teacher_size=size))

  for sub in ("anomaly", "labels"):
    os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
  import json  # pylint: disable=g-import-not-at-top
  # Resume: a re-run into the same folder with the same rule keeps the
  # inputs whose anomaly and label files are already there.
  rule = dict(dataclasses.asdict(spec), teacher=os.path.abspath(teacher),
              from_photos=bool(from_photos))
  spec_path = os.path.join(out_dir, "spec.json")
  if os.path.exists(spec_path):
    with open(spec_path) as f:
      old = json.load(f)
    if old != rule:
      diff = {k: (old.get(k), v) for k, v in rule.items() if old.get(k) != v}
      raise ValueError(f"{out_dir} holds pseudo-labels made with another "
                       f"rule (was, now): {diff}; use another output folder")
  else:
    with open(spec_path + ".tmp", "w") as f:
      json.dump(rule, f, indent=1)
    os.replace(spec_path + ".tmp", spec_path)

  def done(i):
    return all(os.path.exists(os.path.join(out_dir, sub, ids[i] + ext))
               for sub, ext in (("anomaly", ".npy"), ("labels", ".png")))
  rows = []
  bar = None
  if progress:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=len(paths), desc="pseudo-label", unit="img")
  for s in range(0, len(paths), batch_size):
    batch_idx = list(range(s, min(s + batch_size, len(paths))))
    status = {i: ("ok", "") for i in batch_idx if done(i)}
    idx = [i for i in batch_idx if i not in status]
    xs, good = [], []
    if from_photos:
      preps = [fundus.prepare_fundus(paths[i], size=work_size) for i in idx]
      okp = [(i, p) for i, p in zip(idx, preps) if p.status == "ok"]
      for i, p in zip(idx, preps):
        if p.status != "ok":
          status[i] = (p.status, p.message)
      if okp:
        imgs = np.stack([p.image for _, p in okp])
        fovs = np.stack([p.fov_mask for _, p in okp])
        v = np.asarray(vessel_fn(imgs, fovs))
        xs = list(v)
        good = [i for i, _ in okp]
    else:
      for i in idx:
        try:
          with Image.open(paths[i]) as im:
            arr = np.asarray(im.convert("RGB"))
          xs.append(reference_vessel_input(arr, size))
          good.append(i)
        except FileNotFoundError:
          status[i] = ("not_found", f"no such file: {paths[i]}")
        except Exception as e:  # pylint: disable=broad-except
          status[i] = ("unreadable", f"{type(e).__name__}: {e}")
    if good:
      batch = np.stack(xs).astype(np.float32)
      pad = batch_size - len(good)
      if pad:
        batch = np.concatenate([batch, np.zeros((pad,) + batch.shape[1:],
                                                np.float32)])
      an = np.asarray(anomaly_fn(state, batch))[:len(good)]
      for i, a in zip(good, an):
        # Each file appears whole (tmp + rename): a resumed run trusts them.
        dst = os.path.join(out_dir, "anomaly", ids[i] + ".npy")
        with open(dst + ".tmp", "wb") as f:
          np.save(f, a.astype(np.float32))
        os.replace(dst + ".tmp", dst)
        dst = os.path.join(out_dir, "labels", ids[i] + ".png")
        Image.fromarray(patch_labels(a, spec)).save(dst + ".tmp", "PNG")
        os.replace(dst + ".tmp", dst)
        status[i] = ("ok", "")
    for i in batch_idx:
      st, msg = status[i]
      rows.append({"image": paths[i], "id": ids[i], "status": st,
                   "message": msg})
    if bar is not None:
      bar.update(len(batch_idx))
  if bar is not None:
    bar.close()
  with open(os.path.join(out_dir, "manifest.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=["image", "id", "status", "message"])
    w.writeheader()
    w.writerows(rows)
  n_ok = sum(r["status"] == "ok" for r in rows)
  return {"total": len(rows), "ok": n_ok, "failed": len(rows) - n_ok}
