"""Synthetic fundus images written by `efiqa_jax.synth.write_dataset`.

Build (from the repository root), after e.g.
`efiqa_jax.synth.write_dataset("/data/synth", n=10000, seed=0)`:

  tfds build data/efiqa_synth --manual_dir=/data/synth --file_format=array_record

  Or, without the tfds CLI (which in tensorflow-datasets 4.9.10 needs
  apache_beam): python -m data.build efiqa_synth --manual_dir=...

Reads the folder layout write_dataset produces:
  <manual_dir>/labels.csv        id,seed,degradations,severity,degraded_fraction,grade
  <manual_dir>/images/<id>.png   RGB image
  <manual_dir>/vessels/<id>.png  vessel mask (0 / non-zero)
  <manual_dir>/degradation/<id>.(npy|png|tif|tiff)
                                 per-pixel degradation in [0, 1] (0 = clean);
                                 8/16-bit images are divided by 255/65535
Features: image, vessels (H, W, 1) uint8 0/1, degradation (H, W) float32
(zlib-compressed tensor, exact), id, seed, degradations (text, as written),
severity, degraded_fraction, grade (good / usable / reject; the CSV may hold
the names or 0/1/2). Single split `train`.
"""
from __future__ import annotations

try:
  from .. import _common as common
except ImportError:  # `tfds build data/<name>` puts data/ itself on sys.path
  import _common as common  # pylint: disable=import-error

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

GRADE_NAMES = ("good", "usable", "reject")
COLUMNS = ("id", "seed", "degradations", "severity", "degraded_fraction", "grade")
_DEGRADATION_EXTS = (".npy", ".png", ".tif", ".tiff")


def read_degradation(path) -> np.ndarray:
  if path.suffix == ".npy":
    arr = np.load(path).astype(np.float32)
  else:
    with Image.open(path) as im:
      raw = np.array(im)
    if raw.dtype == np.uint8:
      arr = raw.astype(np.float32) / 255.0
    elif raw.dtype == np.uint16:
      arr = raw.astype(np.float32) / 65535.0
    else:
      arr = raw.astype(np.float32)
  if arr.ndim == 3 and arr.shape[-1] == 1:
    arr = arr[..., 0]
  if arr.ndim != 2 or not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
    raise common.DataLayoutError(
        f"{path}: degradation must be (H, W) in [0, 1], got shape {arr.shape} "
        f"range [{np.nanmin(arr)}, {np.nanmax(arr)}]")
  return arr


def grade_of(text: str) -> int:
  t = text.strip().lower()
  if t in GRADE_NAMES:
    return GRADE_NAMES.index(t)
  if t in ("0", "1", "2"):
    return int(t)
  raise common.DataLayoutError(f"grade {text!r} is not one of {GRADE_NAMES} or 0/1/2")


class Builder(tfds.core.GeneratorBasedBuilder):
  """Synthetic fundus images with vessel and degradation ground truth."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Nothing to download: write the data with
    PYTHONPATH=. python -c "from efiqa_jax import synth; synth.write_dataset('/data/synth', n=1000, seed=0)"
  and pass that folder (labels.csv, images/, vessels/, degradation/) as
  --manual_dir.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=common.image_features(
            vessels=common.mask_feature(),
            degradation=tfds.features.Tensor(
                shape=(None, None), dtype=np.float32,
                encoding=tfds.features.Encoding.ZLIB),
            id=tfds.features.Text(),
            seed=tfds.features.Scalar(dtype=np.int64),
            degradations=tfds.features.Text(),
            severity=tfds.features.Scalar(dtype=np.float32),
            degraded_fraction=tfds.features.Scalar(dtype=np.float32),
            grade=tfds.features.ClassLabel(names=GRADE_NAMES)),
        supervised_keys=("image", "grade"),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = common.local(dl_manager.manual_dir)
    return {"train": self._generate_examples(root)}

  def _generate_examples(self, root):
    labels = common.find_file(root, ["labels.csv"])
    header, rows = common.read_csv(labels)
    common.require_columns(labels, header, COLUMNS)
    dirs = {k: common.find_dir(root, [k]) for k in ("images", "vessels", "degradation")}
    index = {k: common.index_by_stem(common.list_images(d) if k != "degradation"
                                     else [p for p in d.iterdir()
                                           if p.suffix.lower() in _DEGRADATION_EXTS])
             for k, d in dirs.items()}
    ids = [r["id"] for r in rows]
    paths = {k: common.resolve_images(ids, index[k], str(dirs[k])) for k in dirs}
    for n, row in enumerate(rows):
      yield row["id"], common.image_example(
          paths["images"][n],
          vessels=common.mask_png(common.binary_mask(paths["vessels"][n])),
          degradation=read_degradation(paths["degradation"][n]),
          id=row["id"], seed=int(row["seed"]),
          degradations=row["degradations"],
          severity=float(row["severity"]),
          degraded_fraction=float(row["degraded_fraction"]),
          grade=grade_of(row["grade"]))
