"""Writes a synthetic dataset to disk, byte-identically for the same arguments.

Layout under out_dir (a local folder or gs://):
  images/<id>.png        the photograph (.jpg instead when the JPEG degradation
                         was applied: the exact encoded bytes, never re-encoded;
                         labels.csv's `image` column names the file)
  vessels/<id>.png       vessel ground truth, 0/255
  degradation/<id>.png   degradation mask, uint8 = round(255 * local severity)
  labels.csv             one row per image (columns in LABEL_COLUMNS)

Image i is generate(seed_i) with seed_i = SeedSequence([seed, i]).generate_state
(one uint32), stored in the `seed` column, so any row can be regenerated alone.
PNGs are written by Pillow with fixed settings and no metadata (no timestamps).
"""
from __future__ import annotations

import csv
import io
import os
from typing import Sequence

import numpy as np
from PIL import Image

from efiqa_jax.synth import degradations
from efiqa_jax.synth import generator

LABEL_COLUMNS = ("id", "image", "seed", "eye", "degradations", "severities",
                 "severity", "degraded_fraction", "mean_degradation", "grade",
                 "lesions")


def image_seed(seed: int, index: int) -> int:
  return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def _save_png(arr: np.ndarray, path):
  # compress_level fixed, no pnginfo: identical bytes for identical arrays.
  from efiqa_jax import files  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
  files.atomic_write_bytes(path, buf.getvalue())  # local or gs://


def write_dataset(out_dir: str | os.PathLike, n: int, seed: int, size: int = 512, *,
                  clean_fraction: float = generator.DEFAULT_CLEAN_FRACTION,
                  lesion_fraction: float = generator.DEFAULT_LESION_FRACTION,
                  lesions: bool = True,
                  kinds: Sequence[str] | str | None = None,
                  overwrite: bool = False,
                  progress: bool = False) -> str:
  """Generates n samples into out_dir; returns the path of labels.csv.

  clean_fraction: probability that an image is left undegraded (default 0.3).
  lesion_fraction: probability that an image has lesions (default 0.35);
    lesions=False disables lesions altogether.
  kinds: the pool degraded images draw their 1-3 kinds from (default: all of
    `degradations.KINDS`).
  overwrite: allow writing into a folder that already has a labels.csv.
  """
  from efiqa_jax import files  # pylint: disable=g-import-not-at-top
  if n < 0:
    raise ValueError(f"n must be >= 0, got {n}")
  out = files.as_path(out_dir)  # local or gs://
  labels_path = out / "labels.csv"
  if labels_path.exists() and not overwrite:
    raise FileExistsError(f"{labels_path} exists; pass overwrite=True (--overwrite)")
  # Validate everything before touching the disk.
  if size < 64:
    raise ValueError(f"size must be >= 64, got {size}")
  for name, v in (("clean_fraction", clean_fraction), ("lesion_fraction", lesion_fraction)):
    if not 0.0 <= v <= 1.0:
      raise ValueError(f"{name} must be in [0, 1], got {v}")
  if kinds is not None:
    kinds = degradations.parse_kinds(kinds)
    if not kinds:
      raise ValueError("kinds is empty")
  for sub in ("images", "vessels", "degradation"):
    (out / sub).mkdir(parents=True, exist_ok=True)
  rows = []
  it = range(n)
  if progress:
    from tqdm import tqdm
    it = tqdm(it, desc="synth", unit="img")
  for i in it:
    sid = f"synth_{i:06d}"
    si = image_seed(seed, i)
    smp = generator.generate(si, size, clean_fraction=clean_fraction,
                             lesion_fraction=lesion_fraction if lesions else 0.0,
                             lesions=None if lesions else False, pool=kinds,
                             sample_id=sid)
    jb = smp.info.get("jpeg_bytes")
    if jb is not None:
      name = f"images/{sid}.jpg"
      files.atomic_write_bytes(out / name, jb)
    else:
      name = f"images/{sid}.png"
      _save_png(smp.image, out / name)
    _save_png(smp.vessels * np.uint8(255), out / "vessels" / f"{sid}.png")
    deg8 = (np.clip(smp.degradation, 0, 1) * 255.0 + 0.5).astype(np.uint8)
    _save_png(deg8, out / "degradation" / f"{sid}.png")
    row = dict(smp.labels)
    row["image"] = name
    rows.append(row)
  f = io.StringIO()
  w = csv.DictWriter(f, fieldnames=LABEL_COLUMNS, lineterminator="\n")
  w.writeheader()
  for row in rows:
    row = {k: (f"{row[k]:.4f}" if isinstance(row[k], float) else row[k])
           for k in LABEL_COLUMNS}
    w.writerow(row)
  files.atomic_write_text(labels_path, f.getvalue())
  return os.fspath(labels_path)
