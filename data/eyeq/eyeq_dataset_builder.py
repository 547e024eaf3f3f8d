"""EyeQ (Fu et al., MICCAI 2019): EyePACS photographs graded Good/Usable/Reject.

Build (from the repository root):

  tfds build data/eyeq --manual_dir=/path/to/eyeq --file_format=array_record \
      --data_dir=~/tensorflow_datasets

  Or, without the tfds CLI (which in tensorflow-datasets 4.9.10 needs
  apache_beam): python -m data.build eyeq --manual_dir=...

Read without TensorFlow:

  ds = tfds.data_source("eyeq", split="test", data_dir="~/tensorflow_datasets")
  ds[0]["quality"]  # 0 good, 1 usable, 2 reject

Labels come from the official CSVs of github.com/HzFu/EyeQ (`data/`):
`Label_EyeQ_train.csv` (12,543 rows) and `Label_EyeQ_test.csv` (16,249 rows),
columns `<unnamed index>, image, quality, DR_grade`, quality 0/1/2 =
Good/Usable/Reject. Images are matched to the CSV by file stem, so either the
original Kaggle DR JPEGs (`10_left.jpeg`) or the output of EyeQ's
preprocessing (`EyeQ_process_main.py`, 800x800) work.
"""
from __future__ import annotations

try:
  from .. import _common as common
except ImportError:  # `tfds build data/<name>` puts data/ itself on sys.path
  import _common as common  # pylint: disable=import-error

import numpy as np
import tensorflow_datasets as tfds

QUALITY_NAMES = ("good", "usable", "reject")  # the CSV's 0 / 1 / 2
LABEL_FILES = {"train": "Label_EyeQ_train.csv", "test": "Label_EyeQ_test.csv"}

_CITATION = """
@inproceedings{fu2019evaluation,
  title={Evaluation of Retinal Image Quality Assessment Networks in Different Color-Spaces},
  author={Fu, Huazhu and Wang, Boyang and Shen, Jianbing and Cui, Shanshan and Xu, Yanwu and Liu, Jiang and Shao, Ling},
  booktitle={MICCAI},
  pages={48--56},
  year={2019}
}
"""


class Builder(tfds.core.GeneratorBasedBuilder):
  """EyeQ image-quality labels on Kaggle DR (EyePACS) photographs."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  1. Download the Kaggle Diabetic Retinopathy Detection images
     (kaggle.com/c/diabetic-retinopathy-detection: train.zip.*, test.zip.*)
     and, optionally, preprocess them with EyeQ's EyeQ_process_main.py.
  2. Download Label_EyeQ_train.csv and Label_EyeQ_test.csv from
     github.com/HzFu/EyeQ (folder data/).
  3. Arrange the manual dir as
       <manual_dir>/Label_EyeQ_train.csv
       <manual_dir>/Label_EyeQ_test.csv
       <manual_dir>/train/...   images of the train CSV (any nesting)
       <manual_dir>/test/...    images of the test CSV
     (without train/ and test/ folders the whole manual dir is searched).
     Images are matched to the CSV `image` column by file stem.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=common.image_features(
            quality=tfds.features.ClassLabel(names=QUALITY_NAMES),
            dr_grade=tfds.features.Scalar(dtype=np.int32)),
        supervised_keys=("image", "quality"),
        homepage="https://github.com/HzFu/EyeQ",
        citation=_CITATION,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = dl_manager.manual_dir
    splits = {}
    for split, label_name in LABEL_FILES.items():
      label_path = common.find_file(root, [label_name])
      image_root = common.find_dir(root, [split], required=False) or root
      splits[split] = self._generate_examples(label_path, image_root)
    return splits

  def _generate_examples(self, label_path, image_root):
    header, rows = common.read_csv(label_path)
    common.require_columns(label_path, header, ["image", "quality", "DR_grade"])
    bad = [r["image"] for r in rows if r["quality"] not in ("0", "1", "2")]
    if bad:
      raise common.DataLayoutError(
          f"{label_path}: quality must be 0/1/2, not for {bad[:10]}")
    paths = common.match_images([r["image"] for r in rows], image_root)
    for row, path in zip(rows, paths):
      yield row["image"], common.image_example(
          path, quality=int(row["quality"]),
          dr_grade=int(float(row["DR_grade"])))
