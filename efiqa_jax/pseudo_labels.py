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
import io
import json
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


class PrepareVesselMap:
  """Grain transform: a vessel-map image path -> row with `x`, the
  reference's teacher input (`reference_vessel_input`), and a status."""

  def __init__(self, size: int):
    self.size = int(size)

  def blank(self, status: str, message: str = "", path: str = "") -> dict:
    from efiqa_jax import sources  # pylint: disable=g-import-not-at-top
    row = sources.blank_row(1, status, message, path)
    del row["image"], row["fov_mask"]
    row["x"] = np.zeros((self.size, self.size, 3), np.float32)
    return row

  def map(self, element) -> dict:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    from efiqa_jax import files  # pylint: disable=g-import-not-at-top
    path = element["path"]
    try:
      data = (element["encoded"] if "encoded" in element
              else files.read_bytes(path))
      with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(im.convert("RGB"))
    except FileNotFoundError:
      return self.blank("not_found", f"no such file: {path}", path)
    except Exception as e:  # pylint: disable=broad-except
      return self.blank("unreadable", f"{type(e).__name__}: {e}", path)
    row = self.blank("ok", "", path)
    row["x"] = reference_vessel_input(arr, self.size)
    row["ok"] = np.bool_(True)
    return row


MANIFEST_FIELDS = ("image", "id", "status", "message")


def write_pseudo_labels(inputs, teacher: str, out_dir: str, *,
                        from_photos: bool = False, spec: LabelSpec = LabelSpec(),
                        batch_size: int = 8, work_size: int = 512,
                        progress: bool = True, overwrite: bool = False,
                        num_workers: int = 0, read_threads: int = 4,
                        max_steps: int | None = None) -> dict:
  """`efiqa pseudo-label`: anomaly maps and patch labels for every input, on
  the inference driver (`efiqa_jax.driver`: multi-process exactly once,
  resumable, tmp-then-rename, one manifest).

  Writes DIR/anomaly/<id>.npy (float32 mean_c |f(x)| at the teacher's
  resolution), DIR/labels/<id>.png (grid x grid uint8), DIR/spec.json (the
  rule) and DIR/manifest.csv (image, id, status, message) with a row for
  every input, failures included. Inputs are vessel-map images (the
  reference's convention) or, with from_photos, photographs whose
  label-free vessel maps are computed first. Re-running into the same
  folder resumes; another rule, teacher or input kind is refused unless
  `overwrite`. batch_size: inputs per step over all processes. Returns
  counts {'total', 'ok', 'failed', 'skipped'}.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top

  from efiqa_jax import checkpoints, driver, files, sources  # pylint: disable=g-import-not-at-top
  from efiqa_jax.teacher import inference  # pylint: disable=g-import-not-at-top

  if isinstance(inputs, (str, os.PathLike)):
    inputs = [inputs]
  resolved = sources.resolve_inputs([os.fspath(p) for p in inputs])
  if not from_photos:
    resolved.require_photographs("without --from-photos the inputs are "
                                 "vessel-map images",
                                 "add --from-photos to read its crops")
  resolved.check_size(work_size, "--work-size")
  paths = resolved.paths
  out = driver.output_dir(out_dir)
  model, meta = checkpoints.load_model(teacher, kind="teacher")
  load_size, size = inference.input_sizes(meta)
  graphdef, state = nnx.split(model)

  def anomaly_fn(state, x):
    return inference.anomaly(nnx.merge(graphdef, state), x)

  if from_photos:
    min_component = inference.min_component_of(meta)

    def fn(state, images, fov_mask):
      return anomaly_fn(state, inference.teacher_input(
          images, fov_mask, teacher_size=size, load_size=load_size,
          min_component=min_component))
    step = driver.LocalDataParallel(fn, ("image", "fov_mask"), params=state)
    prepare = sources.PrepareFundus(work_size)
  else:
    step = driver.LocalDataParallel(anomaly_fn, ("x",), params=state)
    prepare = PrepareVesselMap(size)

  def run_step(host):
    if not np.asarray(host["ok"]).any():
      return None
    return {"anomaly": step(host)}

  def write(rec, res):
    names = (out / "anomaly" / f"{rec['id']}.npy",
             out / "labels" / f"{rec['id']}.png")
    if not rec["ok"]:
      for f in names:
        if f.exists():
          f.unlink()
      return {"status": rec["status"], "message": rec["message"]}
    a = np.asarray(res["anomaly"], np.float32)
    driver.write_npy(names[0], a)
    buf = io.BytesIO()
    Image.fromarray(patch_labels(a, spec)).save(buf, "PNG")
    driver.write_atomic(names[1], buf.getvalue())
    return {"status": "ok", "message": ""}

  rule = dict(dataclasses.asdict(spec),
              teacher=os.fspath(files.abs_path(teacher)),
              from_photos=bool(from_photos))

  def finish(rows, out):
    driver.write_atomic(out / "spec.json", json.dumps(rule, indent=1).encode())
    driver.write_csv(out / "manifest.csv", MANIFEST_FIELDS, rows)

  for sub in ("anomaly", "labels"):
    (out / sub).mkdir(parents=True, exist_ok=True)
  task = driver.Task(
      command="pseudo-label",
      fingerprint={"rule": dataclasses.asdict(spec),
                   "teacher": files.identity(teacher),
                   "teacher_size": size, "from_photos": bool(from_photos),
                   "work_size": int(work_size) if from_photos else None},
      prepare=prepare, step=run_step, write=write,
      done_files=lambda r: [f"anomaly/{r['id']}.npy",
                            f"labels/{r['id']}.png"],
      clear=("anomaly/*", "labels/*", "manifest.csv", "spec.json"),
      temporaries=("anomaly/*.tmp-*", "labels/*.tmp-*", "*.tmp-*"),
      finish=finish, unit=step.global_unit)
  res = driver.run(task, paths, out, source=resolved.source,
                   batch_size=batch_size,
                   overwrite=overwrite, progress=progress,
                   num_workers=num_workers, read_threads=read_threads,
                   max_steps=max_steps)
  return {"total": res.total, "ok": res.ok, "failed": res.failed,
          "skipped": res.skipped}
