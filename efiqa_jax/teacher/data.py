"""Vessel maps for VUAD training and the grain pipeline that feeds them.

Sources (config `data`):
  source='synthetic'  maps from `efiqa_jax.synth.generate(seed, size,
                      degrade=False)`: vessels='ground_truth' blurs the
                      ground-truth vessel mask slightly; vessels='label_free'
                      segments the clean synthetic photograph.
  source='folder'     `data.path` (folder / glob / CSV, see sources.list_inputs):
                      vessels='precomputed' reads vessel-map images (PNG, gray
                      or RGB); vessels='label_free' reads photographs and
                      segments them with `efiqa_jax.vessels` (FOV crop at
                      `data.work_size`, map resized to load_size: the
                      input `efiqa assess` gives the teacher).
                      data.path='tfds:NAME[/CONFIG][:SPLIT]' (label_free):
                      a TFDS build's photographs, NOT loaded; `TFDSMaps`
                      streams them like a prepared folder, each record
                      decoded, cropped and segmented by the folder's code
                      (`photograph_map`) when its process reads it.
  source='prepared'   `data.path` a folder of `efiqa prepare --vessels` (also
                      when given as source='folder'): NOT loaded; `PreparedMaps`
                      streams its records through
                      `input_pipeline.training_batches` (each process its rows
                      of every global batch; the stored probability resized
                      and thresholded per record as below).
Otherwise all maps are stored once as uint8 (N, L, L) at `data.load_size`
with the reference convention (gray <= 50 set to 0) and cached in the
workdir so a resumed run trains on the very same maps.

The pipeline is a grain MapDataset over the host-local records of a fixed
sequence of global batches: global record g = step * global_batch + i, epoch
g // N, shuffled by a per-epoch permutation of seed; each record is augmented
with an rng seeded from (seed, g). Its DatasetIterator state is what the
trainer checkpoints next to the model.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import logging
import math
import os
import re
from typing import Any, Sequence

import grain
import numpy as np
from PIL import Image

from efiqa_jax import files as files_lib
from efiqa_jax.teacher import augment as aug_lib


def _list_files(path: str) -> list[str]:
  from efiqa_jax.sources import list_inputs  # pylint: disable=g-import-not-at-top
  return list(list_inputs([path]))


def _folder_inputs(dc) -> list[str]:
  """data.path's files: vessel maps (precomputed), or the photographs of
  data.split (label_free; a folder with a manifest.csv is read through it,
  see list_good_photos)."""
  if dc.vessels != "label_free":
    return _list_files(dc.path)
  split = str(dc.get("split", "all") or "all")
  return [p.path for p in select_split(list_good_photos(dc.path), split)]


def to_uint8_map(v: np.ndarray, load_size: int, gray_threshold: int,
                 fov_mask: np.ndarray | None = None) -> np.ndarray:
  """float [0,1] or uint8 (H,W[,C]) map -> square uint8 (L,L), thresholded."""
  if v.ndim == 3:
    v = v.mean(-1) if v.dtype != np.uint8 else np.asarray(
        Image.fromarray(v).convert("L"))
  if v.dtype != np.uint8:
    v = np.clip(np.round(np.asarray(v, np.float32) * 255.0), 0, 255).astype(
        np.uint8)
  if fov_mask is not None:
    v = np.where(fov_mask, v, 0).astype(np.uint8)
  h, w = v.shape
  if h != w:  # Pad (centred, black) to a square; never crop anatomy away.
    s = max(h, w)
    sq = np.zeros((s, s), np.uint8)
    sq[(s - h) // 2:(s - h) // 2 + h, (s - w) // 2:(s - w) // 2 + w] = v
    v = sq
  if v.shape[0] != load_size:
    v = np.asarray(Image.fromarray(v).resize((load_size, load_size),
                                             Image.BILINEAR))
  v = v.copy()
  v[v <= gray_threshold] = 0
  return v


def _label_free(images: np.ndarray, fov_masks: np.ndarray,
                size: int | None = None) -> np.ndarray:
  """(B,H,W,3) uint8 + (B,H,W) bool -> (B,size,size) float32 in [0,1].

  `efiqa_jax.vessels.vessel_map_for_teacher` (label-free, no weights): the
  probability at the crop's resolution, resized (antialiased) to `size`
  (default: the input resolution).
  """
  from efiqa_jax import vessels  # pylint: disable=g-import-not-at-top
  h = images.shape[1]
  out = np.asarray(vessels.vessel_map_for_teacher(images, fov_masks,
                                                  size=int(size or h)),
                   np.float32)
  return out[..., 0] if out.ndim == 4 else out


def crop_to_fov(v: np.ndarray, fov_mask: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, float]:
  """Square crop of side 2r around the FOV circle (centroid, r from area),
  zero-padded where it leaves the frame: the prepare_fundus convention, so
  RandomFOV's R_orig (half the map side) is the real FOV radius."""
  ys, xs = np.nonzero(fov_mask)
  if len(ys) == 0:
    raise ValueError("empty FOV mask")
  cy, cx = ys.mean(), xs.mean()
  r = math.sqrt(len(ys) / math.pi)
  side = max(int(round(2 * r)), 1)
  y0, x0 = int(round(cy - side / 2)), int(round(cx - side / 2))
  out = np.zeros((side, side), v.dtype)
  m = np.zeros((side, side), bool)
  sy0, sx0 = max(y0, 0), max(x0, 0)
  sy1, sx1 = min(y0 + side, v.shape[0]), min(x0 + side, v.shape[1])
  out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = v[sy0:sy1, sx0:sx1]
  m[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = fov_mask[sy0:sy1, sx0:sx1]
  return out, m, float(side)


def _blur(v: np.ndarray, sigma: float) -> np.ndarray:
  if sigma <= 0:
    return v.astype(np.float32)
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  b = ndimage.gaussian_filter(v.astype(np.float32), sigma)
  return b / max(float(b.max()), 1e-6) * float(v.max() > 0)


def _synthetic_maps(dc) -> tuple[np.ndarray, np.ndarray, list[dict]]:
  from efiqa_jax import synth  # pylint: disable=g-import-not-at-top
  sc = dc.synthetic
  if dc.vessels not in ("ground_truth", "label_free"):
    raise ValueError(f"data.vessels={dc.vessels!r} is not valid with "
                     "data.source='synthetic' (use 'ground_truth' or "
                     "'label_free')")
  maps, diam = [], []
  chunk = 8  # label-free segmentation runs batched
  for c0 in range(0, int(sc.n), chunk):
    samples = [synth.generate(int(sc.seed) + i, int(sc.size), degrade=False)
               for i in range(c0, min(c0 + chunk, int(sc.n)))]
    if dc.vessels == "ground_truth":
      sigma = float(sc.blur_sigma) * sc.size / 512.0
      vs = [_blur(s.vessels.astype(np.float32), sigma) for s in samples]
    else:
      vs = list(_label_free(np.stack([s.image for s in samples]),
                            np.stack([s.fov_mask for s in samples])))
    for s, v in zip(samples, vs):
      v, m, side = crop_to_fov(np.asarray(v, np.float32), s.fov_mask)
      maps.append(to_uint8_map(v, dc.load_size, dc.gray_threshold, m))
      diam.append(side)
  return np.stack(maps), np.asarray(diam, np.float32), []


def photograph_map(src, work_size: int, load_size: int,
                   gray_threshold: int):
  """A photograph (path or encoded bytes) -> (uint8 (L,L) map or None,
  original FOV diameter, status, message): segmented label-free at the crop
  size `efiqa assess` uses (`map_sizes`' work size), then resized to
  load_size: the map teacher/inference.teacher_input makes. The one path for
  photographs, whether files (`_folder_maps`) or streamed `tfds:` records
  (`TFDSMaps`); data.min_component is applied by the caller."""
  from efiqa_jax import fundus  # pylint: disable=g-import-not-at-top
  p = fundus.prepare_fundus(src, size=work_size)
  if p.status != "ok":
    return None, 0.0, p.status, p.message or ""
  v = _label_free(p.image[None], p.fov_mask[None], load_size)[0]
  return (to_uint8_map(v, load_size, gray_threshold),
          float(p.crop_size), "ok", "")


def map_sizes(dc) -> tuple[int, int, int]:
  """`photograph_map`'s (work_size, load_size, gray_threshold) of a data
  config: work_size 0 means load_size."""
  load = int(dc.load_size)
  return int(dc.get("work_size", 0) or load), load, int(dc.gray_threshold)


def _folder_maps(dc) -> tuple[np.ndarray, np.ndarray, list[dict]]:
  if not dc.path:
    raise ValueError("data.source='folder' needs data.path (a folder, glob or "
                     "CSV with a `path` column)")
  files = _folder_inputs(dc)
  if not files:
    raise ValueError(f"no image files found under data.path={dc.path!r}")
  maps, diam, skipped = [], [], []
  if dc.vessels == "precomputed":
    for f in files:
      try:
        with Image.open(io.BytesIO(files_lib.read_bytes(f))) as im:
          g = np.asarray(im.convert("L"))
      except Exception as e:  # pylint: disable=broad-except
        skipped.append(dict(path=f, status="unreadable", message=str(e)))
        continue
      if min(g.shape) < 16:
        skipped.append(dict(path=f, status="too_small",
                            message=f"shape {g.shape}"))
        continue
      maps.append(to_uint8_map(g, dc.load_size, dc.gray_threshold))
      diam.append(float(max(g.shape)))
  elif dc.vessels == "label_free":
    sizes = map_sizes(dc)
    for f in files:
      v, d, status, message = photograph_map(f, *sizes)
      if v is None:
        skipped.append(dict(path=f, status=status, message=message))
        continue
      maps.append(v)
      diam.append(d)
  else:
    raise ValueError(f"data.vessels={dc.vessels!r} is not valid with "
                     "data.source='folder' (use 'precomputed' or 'label_free')")
  if not maps:
    raise ValueError(f"none of the {len(files)} inputs under {dc.path!r} was "
                     f"usable; first problems: {skipped[:3]}")
  return np.stack(maps), np.asarray(diam, np.float32), skipped


def data_key(dc) -> str:
  blob = json.dumps(dc.to_dict(), sort_keys=True, default=str)
  if dc.source == "folder" and dc.path:
    files = _folder_inputs(dc)
    stats = [(f, files_lib.size_mtime(f)) for f in files]
    blob += json.dumps([(f, *st) for f, st in stats if st is not None])
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_vessel_maps(dc, cache_dir: str | None = None
                     ) -> tuple[np.ndarray, np.ndarray, dict]:
  """Returns (maps (N,L,L) uint8, original diameters (N,), description)."""
  key = data_key(dc)
  cache = (files_lib.join(cache_dir, f"vessel_maps_{key}.npz") if cache_dir
           else None)
  if cache and files_lib.exists(cache):
    z = np.load(io.BytesIO(files_lib.read_bytes(cache)), allow_pickle=False)
    desc = json.loads(str(z["desc"]))
    return z["maps"], z["diam"], desc
  if dc.source == "synthetic":
    maps, diam, skipped = _synthetic_maps(dc)
    what = (f"{len(maps)} clean synthetic fundus images (efiqa_jax.synth, "
            f"seeds {dc.synthetic.seed}..{dc.synthetic.seed + dc.synthetic.n - 1}"
            f", size {dc.synthetic.size}), vessels={dc.vessels}")
  elif dc.source == "folder":
    maps, diam, skipped = _folder_maps(dc)
    what = (f"{len(maps)} {'vessel maps' if dc.vessels == 'precomputed' else 'photographs segmented label-free'}"
            f" from {dc.path}")
  else:
    raise ValueError(f"unknown data.source={dc.source!r} "
                     "(use 'synthetic' or 'folder')")
  min_component = int(dc.get("min_component", 0) or 0)
  if min_component > 1:  # as teacher/inference.teacher_input does
    from efiqa_jax.teacher import inference  # pylint: disable=g-import-not-at-top
    maps = inference.remove_small_components(maps, min_component)
  if skipped:
    logging.warning("skipped %d of %d inputs (see data_skipped.csv): %s",
                    len(skipped), len(skipped) + len(maps), skipped[:3])
    if cache_dir:
      files_lib.atomic_write_csv(files_lib.join(cache_dir, "data_skipped.csv"),
                                 ["path", "status", "message"], skipped)
  desc = dict(description=what, num_maps=int(len(maps)),
              num_skipped=len(skipped), load_size=int(dc.load_size),
              gray_threshold=int(dc.gray_threshold),
              min_component=min_component, data_key=key)
  if cache:
    # Several hosts may share the workdir: each writes whole (atomic) files.
    buf = io.BytesIO()
    np.savez(buf, maps=maps, diam=diam, desc=json.dumps(desc))
    files_lib.atomic_write_bytes(cache, buf.getvalue())
  return maps, diam, desc


class TrainRecords:
  """Random-access host-local records of the whole run (picklable callable)."""

  def __init__(self, maps: np.ndarray, diam: np.ndarray, *, seed: int,
               global_batch: int, process_index: int, process_count: int,
               aug_cfg: aug_lib.AugmentConfig, fov_p_max: float,
               fov_start: float, fov_end: float):
    if global_batch % process_count:
      raise ValueError(f"global batch {global_batch} is not divisible by "
                       f"{process_count} processes")
    self.maps, self.diam = maps, diam
    self.n = len(maps)
    self.seed = int(seed)
    self.gbs = int(global_batch)
    self.lbs = self.gbs // process_count
    self.pi = int(process_index)
    self.pc = int(process_count)
    self.aug_cfg = aug_cfg
    self.fov = (fov_p_max, fov_start, fov_end)

  @functools.lru_cache(maxsize=4)
  def _perm(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, 0x5EED, epoch]).permutation(self.n)

  def global_index(self, local_index: int) -> int:
    # Contiguous: process p holds positions [p*lbs, (p+1)*lbs) of each global
    # batch, so `to_global` (which stacks processes in order) rebuilds the
    # batch in position order and row i gets the same mask draw whatever the
    # number of processes.
    step, within = divmod(int(local_index), self.lbs)
    return step * self.gbs + self.pi * self.lbs + within

  def __call__(self, local_index: int) -> dict[str, Any]:
    g = self.global_index(local_index)
    epoch, pos = divmod(g, self.n)
    src = int(self._perm(epoch)[pos])
    rng = np.random.default_rng([self.seed, g])
    p = aug_lib.fov_probability(epoch, p_max=self.fov[0], start=self.fov[1],
                                end=self.fov[2])
    out, info = aug_lib.augment(self.maps[src], rng, fov_p=p,
                                orig_diameter=float(self.diam[src]),
                                cfg=self.aug_cfg)
    return dict(vmap=out, index=np.int64(g), source=np.int32(src),
                fov_crop=np.bool_(info["fov_crop"]))


def make_train_iterator(records: TrainRecords, total_steps: int, *,
                        num_threads: int = 0, prefetch: int = 0):
  """Checkpointable grain iterator over host-local batches of the whole run."""
  import grain  # pylint: disable=g-import-not-at-top
  ds = grain.MapDataset.range(total_steps * records.lbs).map(records)
  ds = ds.batch(records.lbs, drop_remainder=True)
  opts = grain.ReadOptions(num_threads=num_threads,
                           prefetch_buffer_size=prefetch)
  return iter(ds.to_iter_dataset(opts))


# ------------------------------------------- prepared folders (streamed)


def prepared_path(dc) -> str | None:
  """The prepared folder (`efiqa prepare --vessels`) this config trains
  from, or None (maps made and held in RAM by `load_vessel_maps`):
  data.source='prepared', or data.source='folder' with data.path a prepared
  folder."""
  from efiqa_jax import prepared  # pylint: disable=g-import-not-at-top
  if dc.source == "prepared":
    if not dc.path:
      raise ValueError("data.source='prepared' needs data.path (a folder "
                       "written by `efiqa prepare --vessels`)")
    if str(dc.path).startswith("tfds:"):
      raise ValueError(f"data.path={dc.path}: a TFDS build trains with "
                       "data.source=folder (its photographs are segmented "
                       "as read)")
    return str(dc.path)
  if dc.source == "folder" and dc.path and prepared.is_prepared(dc.path):
    return str(dc.path)
  return None


def _probability_to_load_impl(p, fov_mask, *, size):
  """A stored vessel probability (S,S) -> (size,size) float32: the tail of
  `vessels.vessel_map_for_teacher` (same resize, same FOV cut)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from efiqa_jax.kernels.resize import resize_linear  # pylint: disable=g-import-not-at-top
  pr = resize_linear(p[None], size, size)
  mr = resize_linear(fov_mask[None].astype(jnp.float32), size, size) > 0.5
  return (jnp.clip(pr, 0.0, 1.0) * mr)[0]


@functools.lru_cache(maxsize=None)
def _probability_to_load():
  import jax  # pylint: disable=g-import-not-at-top
  return jax.jit(_probability_to_load_impl, static_argnames=("size",))


def _check_streamed(dc, what: str, holds: str, split_hint: str) -> None:
  """The one-line refusals of a streamed training set (`what`, which holds
  `holds`): label-free maps only, trained whole."""
  if dc.vessels != "label_free":
    raise ValueError(f"data.vessels={dc.vessels!r}: {what} holds {holds} "
                     "(use data.vessels=label_free)")
  if str(dc.get("split", "all") or "all") != "all":
    raise ValueError(f"data.split={dc.split!r}: {what} trains whole "
                     f"({split_hint})")


def prepared_float_map(rec: dict, load_size: int) -> np.ndarray:
  """A prepared record's vessel map at load_size, float32 in [0,1]."""
  return np.asarray(_probability_to_load()(
      np.asarray(rec["vessels"], np.float32), np.asarray(rec["fov_mask"]),
      size=int(load_size)), np.float32)


class PreparedVesselMap:
  """`PreparedSource` record -> {vmap (L,L) uint8, diam}: the map
  `load_vessel_maps` makes from the photograph (label_free), read from the
  record's stored probability instead of segmenting again."""

  def __init__(self, load_size: int, gray_threshold: int,
               min_component: int = 0):
    self.load_size = int(load_size)
    self.gray_threshold = int(gray_threshold)
    self.min_component = int(min_component)

  def blank(self, status: str, message: str = "", path: str = "") -> dict:
    s = self.load_size
    return dict(vmap=np.zeros((s, s), np.uint8), diam=np.float32(0),
                status=status, message=message, path=path, ok=np.bool_(False))

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    rec = element["prepared"]
    path = element.get("path", "")
    if rec["status"] != "ok" or "vessels" not in rec:
      return self.blank(rec["status"] if rec["status"] != "ok" else
                        "no_vessels", rec.get("message") or "", path)
    v = to_uint8_map(prepared_float_map(rec, self.load_size), self.load_size,
                     self.gray_threshold)
    if self.min_component > 1:  # as load_vessel_maps does
      from efiqa_jax.teacher import inference  # pylint: disable=g-import-not-at-top
      v = inference.remove_small_components(v[None], self.min_component)[0]
    row = self.blank("ok", "", path)
    row.update(vmap=v, diam=np.float32(rec["crop"][2]), ok=np.bool_(True))
    return row


class TeacherAugment(grain.transforms.RandomMap):
  """grain RandomMap: the per-record augmentation of `TrainRecords` (flips,
  rotation, RandomFOV with the epoch's probability) on a streamed row; a
  record that could not be read stops training with its path and reason."""

  def __init__(self, n: int, aug_cfg: aug_lib.AugmentConfig,
               fov_p_max: float, fov_start: float, fov_end: float):
    self.n = int(n)
    self.aug_cfg = aug_cfg
    self.fov = (fov_p_max, fov_start, fov_end)

  def random_map(self, row: dict[str, Any], rng: np.random.Generator):
    if not bool(row["ok"]):
      raise ValueError(f"prepared record {row['path']!r} is unusable: "
                       f"{row['status']} {row['message']}".strip())
    epoch = int(row["position"]) // self.n
    p = aug_lib.fov_probability(epoch, p_max=self.fov[0], start=self.fov[1],
                                end=self.fov[2])
    out, info = aug_lib.augment(row["vmap"], rng, fov_p=p,
                                orig_diameter=float(row["diam"]),
                                cfg=self.aug_cfg)
    return dict(vmap=out, index=row["index"], position=row["position"],
                fov_crop=np.bool_(info["fov_crop"]))


class _Streamed:
  """A streamed teacher training set: `source` (random access), `prepare`
  (record -> {vmap, diam, ok, ...}), `n`, `desc`."""

  source: Any
  prepare: Any
  n: int
  desc: dict

  def batches(self, *, seed: int, global_batch: int, num_epochs: int,
              aug_cfg: aug_lib.AugmentConfig, fov_p_max: float,
              fov_start: float, fov_end: float, num_workers: int = 0,
              read_threads: int = 1, prefetch_batches: int = 0,
              process_index: int | None = None,
              process_count: int | None = None):
    """This process's share of the run's batches (`training_batches`):
    contiguous rows of each global batch, augmentation in the pipeline."""
    from efiqa_jax import input_pipeline  # pylint: disable=g-import-not-at-top
    aug = TeacherAugment(self.n, aug_cfg, fov_p_max, fov_start, fov_end)
    return input_pipeline.training_batches(
        self.source, global_batch, seed=seed, prepare=self.prepare,
        augment=[aug], num_epochs=num_epochs, process_index=process_index,
        process_count=process_count, num_workers=num_workers,
        read_threads=read_threads, prefetch_batches=prefetch_batches,
        position_key="position", contiguous=True)


class PreparedMaps(_Streamed):
  """The training set of a prepared folder, streamed: only its manifest
  (paths, statuses) is held; maps are read per record by grain.

  Every ok record trains; the folder must hold vessel maps (`efiqa prepare
  --vessels`) made at the crop size the photographs would be segmented at
  (data.work_size, or load_size when 0).
  """

  def __init__(self, dc):
    from efiqa_jax import prepared  # pylint: disable=g-import-not-at-top
    from efiqa_jax import sources  # pylint: disable=g-import-not-at-top
    path = prepared_path(dc)
    if path is None:
      raise ValueError("not a prepared-folder config")
    _check_streamed(dc, "a prepared folder", "label-free vessel maps",
                    "prepare the split's photographs instead")
    src = prepared.PreparedSource(path)
    pre = src.meta["preprocessing"]
    if not pre.get("vessels"):
      raise ValueError(f"{path} holds no vessel maps: prepare it with "
                       "`efiqa prepare ... --vessels`")
    work = int(dc.get("work_size", 0) or dc.load_size)
    if src.size != work:
      raise ValueError(f"{path} was prepared at {src.size} px; this config "
                       f"segments at data.work_size={work} (set it to "
                       f"{src.size} or prepare again)")
    _, rows = files_lib.read_csv(files_lib.join(path, prepared.MANIFEST))
    ok = [i for i, r in enumerate(rows) if r.get("status") == "ok"]
    skipped = [dict(path=r["image"], status=r.get("status", ""),
                    message=r.get("message", "")) for r in rows
               if r.get("status") != "ok"]
    if not ok:
      raise ValueError(f"none of the {len(rows)} records of {path} is ok; "
                       f"first problems: {skipped[:3]}")
    if skipped:
      logging.warning("skipped %d of %d prepared records (not ok): %s",
                      len(skipped), len(rows), skipped[:3])
    self.path = path
    self.skipped = skipped
    self.source = sources.subset(src, ok)
    self.n = len(ok)
    self.prepare = PreparedVesselMap(dc.load_size, dc.gray_threshold,
                                     int(dc.get("min_component", 0) or 0))
    # Reader threads and prefetch depth change no result: a resume may
    # change them (worker processes change the iterator state's form).
    what = {k: v for k, v in dc.to_dict().items()
            if k not in ("num_threads", "prefetch")}
    blob = json.dumps([what, src.fingerprint, src.meta["shards"],
                       src.meta["counts"]], sort_keys=True, default=str)
    key = hashlib.sha256(blob.encode()).hexdigest()[:16]
    self.desc = dict(
        description=f"{self.n} prepared vessel maps (label-free) from {path}",
        num_maps=self.n, num_skipped=len(skipped),
        load_size=int(dc.load_size), gray_threshold=int(dc.gray_threshold),
        min_component=self.prepare.min_component, data_key=key)


# ------------------------------------------ tfds: photographs (streamed)


def tfds_spec(dc) -> str | None:
  """The `tfds:NAME[/CONFIG][:SPLIT]` this config trains from
  (data.source='folder', data.path='tfds:...'), or None."""
  from efiqa_jax import sources  # pylint: disable=g-import-not-at-top
  path = str(dc.get("path", "") or "")
  if dc.source == "folder" and path.startswith(sources.TFDS_PREFIX):
    return path
  return None


def streamed_maps(dc):
  """The streamed training set of this config (`PreparedMaps` for a
  prepared folder, `TFDSMaps` for `tfds:`), or None: maps made and held in
  RAM by `load_vessel_maps`."""
  if tfds_spec(dc) is not None:
    return TFDSMaps(dc)
  if prepared_path(dc) is not None:
    return PreparedMaps(dc)
  return None


class PhotographVesselMap:
  """`TFDSInputs` record {'path', 'encoded'} -> {vmap (L,L) uint8, diam}:
  the photograph decoded, FOV-cropped and segmented by `photograph_map`, the
  code `load_vessel_maps` runs on a folder of the same photographs."""

  def __init__(self, dc):
    # Plain ints, no ConfigDict: picklable for grain worker processes.
    self.sizes = map_sizes(dc)
    self.min_component = int(dc.get("min_component", 0) or 0)

  blank = PreparedVesselMap.blank

  @property
  def load_size(self) -> int:
    return self.sizes[1]

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    from efiqa_jax import sources  # pylint: disable=g-import-not-at-top
    path = element.get("path", "")
    v, d, status, message = photograph_map(sources.record_source(element),
                                           *self.sizes)
    if v is None:
      return self.blank(status, message, path)
    if self.min_component > 1:  # as load_vessel_maps does
      from efiqa_jax.teacher import inference  # pylint: disable=g-import-not-at-top
      v = inference.remove_small_components(v[None], self.min_component)[0]
    row = self.blank("ok", "", path)
    row.update(vmap=v, diam=np.float32(d), ok=np.bool_(True))
    return row


class TFDSMaps(_Streamed):
  """The training set of a TFDS build (`data.path=tfds:NAME[/CONFIG][:SPLIT]`
  with data.source='folder', data.vessels='label_free'), streamed: each
  process reads only its rows of every global batch and decodes, FOV-crops
  and segments each photograph when it reads it (`PhotographVesselMap`), so
  nothing is held or cached per dataset. A photograph is segmented again at
  every epoch: for many epochs, `efiqa prepare tfds:... --vessels` once and
  train on that folder. Every record trains: one that cannot be decoded
  stops training with its id and reason (prepare keeps it as a status row).
  """

  def __init__(self, dc):
    from efiqa_jax import sources  # pylint: disable=g-import-not-at-top
    spec = tfds_spec(dc)
    if spec is None:
      raise ValueError("not a tfds: config")
    _check_streamed(dc, "a tfds: dataset", "photographs",
                    "name the split in tfds:NAME:SPLIT")
    inputs = sources.TFDSInputs(spec)
    if len(inputs) == 0:  # pylint: disable=g-explicit-length-test
      raise sources.NoInputsError(f"{spec} holds no record")
    self.spec = spec
    self.source = inputs
    self.n = len(inputs)
    self.skipped = []
    self.prepare = PhotographVesselMap(dc)
    what = {k: v for k, v in dc.to_dict().items()
            if k not in ("num_threads", "prefetch", "num_workers")}
    info = inputs.dataset_info
    # A rebuilt dataset (other bytes) is another training set.
    try:
      split_bytes = int(info.splits[inputs.split].num_bytes)
    except Exception:  # pylint: disable=broad-except
      split_bytes = -1  # a split spelling TFDS cannot size: names + version
    blob = json.dumps([what, str(info.full_name), str(info.version),
                       split_bytes, inputs.paths], sort_keys=True,
                      default=str)
    key = hashlib.sha256(blob.encode()).hexdigest()[:16]
    self.desc = dict(
        description=(f"{self.n} photographs of {spec} ({info.full_name}) "
                     "segmented label-free, streamed"),
        num_maps=self.n, num_skipped=0, load_size=int(dc.load_size),
        gray_threshold=int(dc.gray_threshold),
        min_component=self.prepare.min_component, data_key=key)


# ------------------------------------------------ good photographs, splits

SPLITS = ("train", "calibration", "heldout")
# Shares of each stratum's subjects; the rest trains.
HELDOUT_SHARE = 0.2
CALIBRATION_SHARE = 0.15
# A trailing eye marker (chase_01L, 116_right, x_OD): both eyes of one
# person share a split.
_EYE = re.compile(r"(?i)(?:(?<=\d)[lr]|[_-](?:left|right|od|os|l|r))$")


@dataclasses.dataclass(frozen=True)
class GoodPhoto:
  """A good photograph for training or calibration.

  stratum: the set it belongs to (a folder manifest's `set` column, else the
  first folder below the input folder); group: the subject (the id without
  an eye marker); vessels / fov: a manual vessel annotation and FOV mask when
  a folder manifest names them ('' otherwise).
  """
  path: str
  id: str
  stratum: str
  group: str
  vessels: str = ""
  fov: str = ""


def subject_of(photo_id: str) -> str:
  return _EYE.sub("", photo_id)


def _manifest_photos(folder: str) -> list[GoodPhoto] | None:
  """A folder whose manifest.csv has an `image` column (the layout of
  ../shared/data/fundus_train): its rows, annotations included."""
  mf = files_lib.join(folder, "manifest.csv")
  if not files_lib.isfile(mf):
    return None
  _, rows = files_lib.read_csv(mf)
  if not rows or "image" not in rows[0]:
    return None

  def rel(v):
    return files_lib.join(folder, v) if v else ""

  out = []
  for r in rows:
    pid = r.get("id") or os.path.splitext(os.path.basename(r["image"]))[0]
    stratum = r.get("set") or r["image"].replace(os.sep, "/").split("/")[0]
    out.append(GoodPhoto(path=rel(r["image"]), id=pid, stratum=stratum,
                         group=subject_of(pid), vessels=rel(r.get("vessels")),
                         fov=rel(r.get("fov") or r.get("fov_thirdparty"))))
  return out


def list_good_photos(inputs: Sequence[str] | str) -> list[GoodPhoto]:
  """Good photographs from files, folders, globs or CSVs (sources rules).

  A folder holding a manifest.csv with an `image` column is read through it,
  so its annotation and mask files are not taken for photographs.
  """
  from efiqa_jax import sources  # pylint: disable=g-import-not-at-top
  if isinstance(inputs, str):
    inputs = [inputs]
  photos: list[GoodPhoto] = []
  for inp in inputs:
    is_dir = files_lib.isdir(inp)  # local or gs://
    listed = _manifest_photos(inp) if is_dir else None
    if listed is None:
      paths = sources.list_inputs([inp])
      listed = []
      for p in paths:
        if is_dir:
          stratum = os.path.relpath(p, inp).replace(os.sep, "/").split("/")[0]
          stratum = "" if stratum == os.path.basename(p) else stratum
        else:
          stratum = os.path.basename(os.path.dirname(os.path.abspath(p)))
        listed.append(GoodPhoto(path=p, id="", stratum=stratum, group=""))
    photos += listed
  ids = sources.unique_ids([p.path for p in photos])
  return [dataclasses.replace(p, id=p.id or i,
                              group=p.group or subject_of(p.id or i))
          for p, i in zip(photos, ids)]


def assign_splits(photos: Sequence[GoodPhoto]) -> dict[str, str]:
  """{photo id: 'train' | 'calibration' | 'heldout'}, fixed by hashing.

  Within each stratum the subjects are ordered by sha256(stratum/subject);
  the first round(HELDOUT_SHARE * n) are held out, the next
  round(CALIBRATION_SHARE * n) calibrate, the rest train. Deterministic, no
  file to keep, and both eyes of one person land in the same split.
  """
  by_stratum: dict[str, set] = {}
  for p in photos:
    by_stratum.setdefault(p.stratum, set()).add(p.group)
  split_of_group = {}
  for stratum, groups in by_stratum.items():
    order = sorted(groups, key=lambda g: hashlib.sha256(
        f"{stratum}/{g}".encode()).hexdigest())
    n_held = int(round(HELDOUT_SHARE * len(order)))
    n_cal = int(round(CALIBRATION_SHARE * len(order)))
    for k, g in enumerate(order):
      split_of_group[(stratum, g)] = (
          "heldout" if k < n_held else
          "calibration" if k < n_held + n_cal else "train")
  return {p.id: split_of_group[(p.stratum, p.group)] for p in photos}


def select_split(photos: Sequence[GoodPhoto], split: str
                 ) -> list[GoodPhoto]:
  """The photographs of one split ('all' keeps every photograph)."""
  if split == "all":
    return list(photos)
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r} (use one of {SPLITS} or "
                     "'all')")
  s = assign_splits(photos)
  return [p for p in photos if s[p.id] == split]
