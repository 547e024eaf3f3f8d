"""mBRSET (Wu et al. 2025, PhysioNet): smartphone/handheld fundus photographs.

5,164 images from 1,291 patients taken with a portable retinal camera in
Brazil, each graded as gradable or not (`final_quality` yes/no in
`labels_mbrset.csv`); about 95 % are gradable.

Build (from the repository root):

  tfds build data/mbrset --manual_dir=/path/to/physionet.org/files/mbrset/1.0 \
      --file_format=array_record

  Or, without the tfds CLI (which in tensorflow-datasets 4.9.10 needs
  apache_beam): python -m data.build mbrset --manual_dir=...

Labels: `quality` 0 = gradable (`final_quality == "yes"`), 1 = ungradable
("no"), so label 1 is the low-quality class as in the other binary sets.
`dr_grade` is `final_icdr` (0-4, -1 where the CSV leaves it empty),
`patient` and `laterality` are copied as text. Single split `train`.
"""
from __future__ import annotations

try:
  from .. import _common as common
except ImportError:  # `tfds build data/<name>` puts data/ itself on sys.path
  import _common as common  # pylint: disable=import-error

import numpy as np
import tensorflow_datasets as tfds

QUALITY_NAMES = ("gradable", "ungradable")
QUALITY_VALUES = {"yes": 0, "no": 1}
FILE_COLUMN = "file"
QUALITY_COLUMN = "final_quality"
DR_COLUMN = "final_icdr"

_CITATION = """
@article{wu2025mbrset,
  title={mBRSET: A Portable Retina Fundus Photos Benchmark Dataset for Clinical and Demographic Prediction},
  author={Wu, Chenwei and Restrepo, David and Nakayama, Luis Filipe and Ribeiro, Lucas Zago and Shuai, Zitao and Barboza, Nathan Santos and Sousa, Maria Luiza Vieira and Fitterman, Raul Dias and Pereira, Alexandre Durao Alves and Regatieri, Caio Vinicius Saito and Stuchi, Jose Augusto and Malerbi, Fernando Korn and Andrade, Rafael E.},
  journal={medRxiv},
  year={2024},
  note={Data on PhysioNet, https://physionet.org/content/mbrset/}
}
"""


class Builder(tfds.core.GeneratorBasedBuilder):
  """mBRSET gradability labels on handheld-camera fundus photographs."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  mBRSET needs credentialed PhysioNet access (physionet.org/content/mbrset/).
  Download version 1.0 (e.g. `wget -r -N -c -np --user <you> --ask-password
  https://physionet.org/files/mbrset/1.0/`) and pass the version folder as
  the manual dir:
    <manual_dir>/labels_mbrset.csv   columns include file, final_quality,
                                     final_icdr, patient, laterality
    <manual_dir>/images/*.jpg
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=common.image_features(
            quality=tfds.features.ClassLabel(names=QUALITY_NAMES),
            dr_grade=tfds.features.Scalar(dtype=np.int32),
            patient=tfds.features.Text(), laterality=tfds.features.Text()),
        supervised_keys=("image", "quality"),
        homepage="https://physionet.org/content/mbrset/",
        citation=_CITATION,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = common.local(dl_manager.manual_dir)
    labels = common.find_file(root, ["labels_mbrset.csv"])
    images = common.find_dir(root, ["images"])
    return {"train": self._generate_examples(labels, images)}

  def _generate_examples(self, labels, images):
    header, rows = common.read_csv(labels)
    common.require_columns(labels, header, [FILE_COLUMN, QUALITY_COLUMN])
    bad = [f"{r[FILE_COLUMN]}={r[QUALITY_COLUMN]!r}" for r in rows
           if r[QUALITY_COLUMN].lower() not in QUALITY_VALUES]
    if bad:
      raise common.DataLayoutError(
          f"{labels}: {len(bad)} row(s) with {QUALITY_COLUMN} not yes/no: "
          f"{bad[:10]}")
    paths = common.match_images([r[FILE_COLUMN] for r in rows], images)
    for row, path in zip(rows, paths):
      yield path.name, common.image_example(
          path, quality=QUALITY_VALUES[row[QUALITY_COLUMN].lower()],
          dr_grade=_int_or(row.get(DR_COLUMN, ""), -1),
          patient=row.get("patient", ""),
          laterality=row.get("laterality", ""))


def _int_or(text: str, default: int) -> int:
  text = text.strip()
  if text in ("", "nan", "NaN", "NA"):
    return default
  return int(float(text))
