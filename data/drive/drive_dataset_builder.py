"""DRIVE (Staal et al. 2004): 40 retinal images with manual vessel masks.

Build (from the repository root):

  tfds build data/drive --manual_dir=/path/to/DRIVE --file_format=array_record

  Or, without the tfds CLI (which in tensorflow-datasets 4.9.10 needs
  apache_beam): python -m data.build drive --manual_dir=...

Splits `train` (20 images, training/) and `test` (20 images, test/).
Features: `image` (the TIFF converted once to a lossless RGB PNG),
`vessels` (H, W, 1) uint8 0/1 from the first observer (`1st_manual/`),
`fov_mask` (H, W, 1) uint8 0/1 from `mask/`, `image/filename`, `id` (the
two-digit number). The test set's second observer (`2nd_manual/`) is not
stored. Images, vessels and masks pair by their leading number.
"""
from __future__ import annotations

try:
  from .. import _common as common
except ImportError:  # `tfds build data/<name>` puts data/ itself on sys.path
  import _common as common  # pylint: disable=import-error

import tensorflow_datasets as tfds

SPLIT_FOLDERS = {"train": "training", "test": "test"}

_CITATION = """
@article{staal2004ridge,
  title={Ridge-based vessel segmentation in color images of the retina},
  author={Staal, Joes and Abr{\\`a}moff, Michael D and Niemeijer, Meindert and Viergever, Max A and Van Ginneken, Bram},
  journal={IEEE Transactions on Medical Imaging},
  volume={23},
  number={4},
  pages={501--509},
  year={2004}
}
"""


class Builder(tfds.core.GeneratorBasedBuilder):
  """DRIVE images with vessel and field-of-view masks."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download DRIVE (drive.grand-challenge.org, registration needed) and
  extract it so that the manual dir holds (one extra folder level such as
  <manual_dir>/DRIVE/ is also accepted):
    training/images/21_training.tif ...   training/1st_manual/21_manual1.gif
    training/mask/21_training_mask.gif
    test/images/01_test.tif ...           test/1st_manual/01_manual1.gif
    test/mask/01_test_mask.gif
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=common.image_features(
            id=tfds.features.Text(), vessels=common.mask_feature(),
            fov_mask=common.mask_feature()),
        supervised_keys=("image", "vessels"),
        homepage="https://drive.grand-challenge.org/",
        citation=_CITATION,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = common.find_root(dl_manager.manual_dir, ["training"])
    return {split: self._generate_examples(common.find_dir(root, [folder]))
            for split, folder in SPLIT_FOLDERS.items()}

  def _generate_examples(self, split_dir):
    parts = {}
    for kind, folder in (("image", "images"), ("vessels", "1st_manual"),
                         ("fov_mask", "mask")):
      d = common.find_dir(split_dir, [folder])
      files = {}
      for p in common.list_images(d, recursive=False):
        key = p.name.split("_")[0]
        if key in files:
          raise common.DataLayoutError(f"{d}: two files for number {key}")
        files[key] = p
      if not files:
        raise common.DataLayoutError(f"{d} holds no images")
      parts[kind] = files
    ids = sorted(parts["image"])
    for kind in ("vessels", "fov_mask"):
      if sorted(parts[kind]) != ids:
        raise common.DataLayoutError(
            f"{split_dir}: images {ids} and {kind} {sorted(parts[kind])} "
            "do not pair up by number")
    for i in ids:
      yield i, common.image_example(
          parts["image"][i], id=i,
          vessels=common.mask_png(common.binary_mask(parts["vessels"][i])),
          fov_mask=common.mask_png(common.binary_mask(parts["fov_mask"][i])))
