"""DRIMDB (Sevik et al. 2014): 216 fundus images sorted into Good/Bad/Outlier.

Build (from the repository root):

  tfds build data/drimdb --manual_dir=/path/to/DRIMDB --file_format=array_record
  tfds build data/drimdb --config=all --manual_dir=/path/to/DRIMDB \
      --file_format=array_record

  Or, without the tfds CLI (which in tensorflow-datasets 4.9.10 needs
  apache_beam): python -m data.build drimdb --manual_dir=...

Configs:
  good_bad (default): 194 images, label good (0) / bad (1); the Outlier
      folder (which includes non-fundus images) is left out, as in EFIQA.
  all: 216 images, label good (0) / bad (1) / outlier (2).

Labels are the folder names of the distribution (Kaggle "drimdb-diabetic-
retinopathy-images-database" or academictorrents): `Good/`, `Bad/`,
`Outlier/` (case-insensitive), either directly in the manual dir or in one
sub-folder of it. Single split `train` (evaluation set; no official split).
"""
from __future__ import annotations

import dataclasses

try:
  from .. import _common as common
except ImportError:  # `tfds build data/<name>` puts data/ itself on sys.path
  import _common as common  # pylint: disable=import-error

import tensorflow_datasets as tfds

CLASS_FOLDERS = ("good", "bad", "outlier")  # label index = position

_CITATION = """
@article{sevik2014identification,
  title={Identification of suitable fundus images using automated quality assessment methods},
  author={{\\c{S}}evik, U{\\u{g}}ur and K{\\"o}se, Cemal and Berber, Tolga and Erdol, Hidayet},
  journal={Journal of Biomedical Optics},
  volume={19},
  number={4},
  pages={046006},
  year={2014}
}
"""


@dataclasses.dataclass
class DrimdbConfig(tfds.core.BuilderConfig):
  include_outliers: bool = False


class Builder(tfds.core.GeneratorBasedBuilder):
  """DRIMDB image-quality classes (good / bad [/ outlier])."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      DrimdbConfig(name="good_bad", include_outliers=False,
                   description="Good and Bad only (EFIQA protocol)."),
      DrimdbConfig(name="all", include_outliers=True,
                   description="Good, Bad and Outlier."),
  ]
  DEFAULT_CONFIG_NAME = "good_bad"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download DRIMDB (e.g. kaggle.com/datasets/subhajournal/drimdb-diabetic-
  retinopathy-images-database) and extract it so that the manual dir holds
    <manual_dir>/Good/*.jpg
    <manual_dir>/Bad/*.jpg
    <manual_dir>/Outlier/*.jpg
  (one extra folder level, e.g. <manual_dir>/DRIMDB/Good, is also accepted).
  """

  def _info(self) -> tfds.core.DatasetInfo:
    names = CLASS_FOLDERS if self.builder_config.include_outliers else CLASS_FOLDERS[:2]
    return self.dataset_info_from_configs(
        features=common.image_features(
            label=tfds.features.ClassLabel(names=names)),
        supervised_keys=("image", "label"),
        homepage="https://www.kaggle.com/datasets/subhajournal/drimdb-diabetic-retinopathy-images-database",
        citation=_CITATION,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = common.find_root(dl_manager.manual_dir, ["good", "bad"])
    return {"train": self._generate_examples(root)}

  def _generate_examples(self, root):
    n_classes = 3 if self.builder_config.include_outliers else 2
    for label, folder in enumerate(CLASS_FOLDERS[:n_classes]):
      class_dir = common.find_dir(root, [folder])
      images = common.list_images(class_dir)
      if not images:
        raise common.DataLayoutError(f"{class_dir} holds no images")
      for path in images:
        yield path.relative_to(root).as_posix(), common.image_example(
            path, label=label)
