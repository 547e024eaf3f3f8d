"""Training data for the adapter: (features | photographs) x pseudo-labels.

Matching follows the reference `SIFDataset`: feature file, patch-label PNG
(and photograph) are paired by id (file stem); labels are binarised with
> 0. Ids present on one side only are reported (`DataReport`), never
silently dropped.

Batches are a grain `MapDataset` indexed by the training step: batch s is a
pure function of (seed, s) -- epoch e = s // steps_per_epoch uses the
permutation `default_rng([seed, e])` -- so a resumed run reads exactly the
batches an uninterrupted run would. The last batch of an epoch is padded to
the fixed batch size with `mask` = 0 rows (static shapes for jit).
"""
from __future__ import annotations

import dataclasses
import io
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image

from efiqa_jax import files as files_lib


@dataclasses.dataclass
class DataReport:
  matched: list[str]
  features_without_label: list[str]
  labels_without_features: list[str]
  not_ok: list[tuple[str, str]]   # (id, status) rows of the manifest

  def as_dict(self) -> dict:
    return dict(matched=len(self.matched),
                features_without_label=self.features_without_label,
                labels_without_features=self.labels_without_features,
                not_ok=[list(x) for x in self.not_ok])


def label_files(labels_dir: str) -> dict[str, str]:
  """id -> PNG path; `labels_dir` is a pseudo-label output dir (with a
  labels/ subfolder) or a folder of grid PNGs."""
  d = os.fspath(labels_dir)
  if files_lib.isdir(files_lib.join(d, "labels")):
    d = files_lib.join(d, "labels")
  if not files_lib.isdir(d):
    raise FileNotFoundError(f"label folder not found: {labels_dir}")
  names = sorted(p.name for p in files_lib.as_path(d).iterdir())
  return {os.path.splitext(f)[0]: files_lib.join(d, f)
          for f in names if f.lower().endswith(".png")}


def read_label(path: str) -> np.ndarray:
  """Grid PNG -> (gh, gw) float32 in {0, 1} (> 0 is positive = degraded)."""
  a = np.asarray(Image.open(io.BytesIO(files_lib.read_bytes(path))))
  if a.ndim == 3:
    a = a[..., 0]
  return (a > 0).astype(np.float32)


def resize_nearest(y: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  """torch F.interpolate(mode='nearest'): source index floor(i * in / out)
  (what the reference trainer does when label and output grids differ)."""
  h, w = y.shape
  ri = np.floor(np.arange(shape[0]) * (h / shape[0])).astype(int)
  ci = np.floor(np.arange(shape[1]) * (w / shape[1])).astype(int)
  return y[np.minimum(ri, h - 1)][:, np.minimum(ci, w - 1)]


def feature_files(features_dir: str) -> tuple[dict[str, str], list, dict]:
  """(id -> .npy path (or, for ArrayRecord output, the array), not-ok
  manifest rows, metadata) of `efiqa extract` output."""
  from efiqa_jax.encoders import extract
  features_dir = os.fspath(features_dir)
  meta_path = files_lib.join(features_dir, extract.METADATA)
  meta = {}
  if files_lib.exists(meta_path):
    meta = files_lib.read_json(meta_path)
  out, bad = {}, []
  if meta.get("format", "npy") == "arrayrecord":
    # Shards are read into memory once (id -> (gh, gw, D) array).
    for id_, _, arr in extract.iter_arrayrecord(features_dir):
      out[id_] = arr
    for r in extract.read_manifest(features_dir):
      if r["status"] != "ok":
        bad.append((r["id"], r["status"]))
    if not out:
      raise ValueError(f"no features in {features_dir}")
    return out, bad, meta
  if meta.get("format", "npy") != "npy":
    raise ValueError(f"{features_dir}: unknown format {meta.get('format')!r}")
  if files_lib.exists(files_lib.join(features_dir, extract.MANIFEST)):
    for r in extract.read_manifest(features_dir):
      if r["status"] == "ok" and r.get("file"):
        out[r["id"]] = files_lib.join(features_dir, r["file"])
      else:
        bad.append((r["id"], r["status"]))
  else:  # a plain folder of <id>.npy (e.g. the reference extractor's)
    for f in sorted(p.name for p in
                    files_lib.as_path(features_dir).iterdir()):
      if f.endswith(".npy"):
        out[f[:-4]] = files_lib.join(features_dir, f)
  if not out:
    raise ValueError(f"no feature files in {features_dir}")
  return out, bad, meta


def match(left: dict[str, str], labels: dict[str, str], not_ok=()
          ) -> DataReport:
  # Sorted: the data order does not depend on how the features are stored.
  ids = sorted(i for i in left if i in labels)
  return DataReport(ids, sorted(set(left) - set(labels)),
                    sorted(set(labels) - set(left)), list(not_ok))


def load_features(f) -> np.ndarray:
  """A feature entry (path of an .npy or an in-memory array) as float32."""
  return (files_lib.load_npy(f) if isinstance(f, str)
          else np.asarray(f)).astype(np.float32)


def steps_per_epoch(n: int, batch: int) -> int:
  return -(-n // batch)


def epoch_indices(n: int, batch: int, seed: int, step: int
                  ) -> tuple[np.ndarray, np.ndarray]:
  """(indices (batch,), mask (batch,)) of the items in batch `step`."""
  spe = steps_per_epoch(n, batch)
  epoch, k = divmod(int(step), spe)
  perm = np.random.default_rng([int(seed), epoch]).permutation(n)
  idx = perm[k * batch:(k + 1) * batch]
  mask = np.zeros(batch, np.float32)
  mask[:len(idx)] = 1.0
  full = np.zeros(batch, np.int64)
  full[:len(idx)] = idx
  return full, mask


class PatchBatch:
  """step -> {x (B, D), y (B,), mask (B,)} from in-memory patch arrays."""

  def __init__(self, x: np.ndarray, y: np.ndarray, batch: int, seed: int):
    self.x, self.y, self.batch, self.seed = x, y, batch, seed

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    idx, mask = epoch_indices(len(self.x), self.batch, self.seed, step)
    return {"x": self.x[idx], "y": self.y[idx] * mask, "mask": mask}


class ImageFeatureBatch:
  """step -> {x (B, gh, gw, D), y (B, oh, ow), mask (B, oh, ow)}."""

  def __init__(self, feats: Sequence, labels: Sequence[np.ndarray],
               batch: int, seed: int, flip: bool = False):
    self.feats, self.labels = feats, labels
    self.batch, self.seed, self.flip = batch, seed, flip

  def _feat(self, i):
    return load_features(self.feats[i])

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    idx, mask = epoch_indices(len(self.feats), self.batch, self.seed, step)
    x = np.stack([self._feat(i) for i in idx])
    y = np.stack([self.labels[i] for i in idx])
    if self.flip:
      x, y = _flip(x, y, self.seed, step)
    m = np.broadcast_to(mask[:, None, None], y.shape).astype(np.float32)
    return {"x": x, "y": y * m, "mask": np.ascontiguousarray(m)}


def _flip(x, y, seed, step):
  """Horizontal flip per sample, drawn from (seed, step)."""
  rng = np.random.default_rng([int(seed), int(step), 7])
  f = rng.random(x.shape[0]) < 0.5
  x = np.where(f[:, None, None, None], x[:, :, ::-1], x)
  y = np.where(f[:, None, None], y[:, :, ::-1], y)
  return x, y


class PixelBatch:
  """step -> {pixels (B, S, S, 3) float32 normalised, y, mask} for the end-to-
  end mode (`encoders.extract.PrepareEncoderInput`: the FOV crop or, with
  preprocess='efiqa', the whole photograph; EFIQA's resize/normalisation).

  `check()` prepares every photograph once up front, returns the ones that
  fail (so training never dies on a bad file mid-run) and keeps the prepared
  pixels in memory up to `cache_bytes`; the rest are prepared again when
  their batch comes."""

  def __init__(self, paths: Sequence[str], labels: Sequence[np.ndarray],
               batch: int, seed: int, size: int, work_size: int,
               flip: bool = False, cache_bytes: float = 4e9,
               preprocess: str = "fov"):
    from efiqa_jax.encoders import extract
    self.paths, self.labels = list(paths), list(labels)
    self.batch, self.seed, self.flip = batch, seed, flip
    self._prep = extract.PrepareEncoderInput(size, work_size=work_size,
                                             preprocess=preprocess)
    self._cache: dict[int, np.ndarray] = {}
    self.size = size
    self.cache_bytes = cache_bytes

  def check(self) -> list[tuple[int, str]]:
    """Prepare all; drop failures; -> [(original index, status message)]."""
    keep, failed, used = [], [], 0
    cache = {}
    for i, p in enumerate(self.paths):
      row = self._prep.map({"path": p})
      if not bool(row["ok"]):
        failed.append((i, f"{row['status']}: {row['message']}"))
        continue
      if used + row["pixels"].nbytes <= self.cache_bytes:
        cache[len(keep)] = row["pixels"]
        used += row["pixels"].nbytes
      keep.append(i)
    self.paths = [self.paths[i] for i in keep]
    self.labels = [self.labels[i] for i in keep]
    self._cache = cache
    return failed

  def pixels(self, i: int) -> np.ndarray:
    if i in self._cache:
      return self._cache[i]
    row = self._prep.map({"path": self.paths[i]})
    if not bool(row["ok"]):
      raise ValueError(f"{self.paths[i]}: {row['status']} {row['message']}")
    return row["pixels"]

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    idx, mask = epoch_indices(len(self.paths), self.batch, self.seed, step)
    x = np.stack([self.pixels(i) for i in idx])
    y = np.stack([self.labels[i] for i in idx])
    if self.flip:
      # Flipping the photograph flips its token grid; the label grid follows.
      x, y = _flip(x, y, self.seed, step)
    m = np.broadcast_to(mask[:, None, None], y.shape).astype(np.float32)
    return {"pixels": x, "y": y * m, "mask": np.ascontiguousarray(m)}


def step_dataset(make_batch: Any, start: int, total: int, *,
                 threads: int = 2, prefetch: int = 4):
  """grain pipeline over steps [start, total): batch s = make_batch(s)."""
  import grain
  ds = grain.MapDataset.range(start, total).map(make_batch)
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                              prefetch_buffer_size=prefetch))
