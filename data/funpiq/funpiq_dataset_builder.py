"""FunPiQ (MICCAI 2026): pixel-level fundus image quality annotations.

300 colour fundus photographs from EyeQ, BRSET and mBRSET, each with an
indexed (palette) PNG whose pixel values are classes:
  0 background (outside the field of view), 1 good, 2 usable, 3 bad.
The annotations are released by the FunPiQ authors (GitHub release v1.0.0 of
the FunPiQ repository, or Zenodo record 21838047); the images are not, so
they come from the user's own EyeQ (preprocessed with EyeQ's official script),
BRSET 1.0.1 and mBRSET 1.0 downloads.

Build (from the repository root):

  tfds build data/funpiq --manual_dir=/path/to/funpiq --file_format=array_record

  Or, without the tfds CLI (which in tensorflow-datasets 4.9.10 needs
  apache_beam): python -m data.build funpiq --manual_dir=...

Masks are read with PIL (`np.array(Image.open(p))` keeps palette indices;
OpenCV would expand the palette to colours) and stored as single-channel PNGs
of the indices, so any decoder gets the classes back. A mask saved as RGB
with the FunPiQ colours is mapped back to indices; any other colour or index
above 3 stops the build. Images pair with masks by file stem. Single split
`test` (FunPiQ is an evaluation benchmark).
"""
from __future__ import annotations

try:
  from .. import _common as common
except ImportError:  # `tfds build data/<name>` puts data/ itself on sys.path
  import _common as common  # pylint: disable=import-error

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

CLASS_NAMES = ("background", "good", "usable", "bad")
# The release's palette: index -> RGB.
PALETTE = {0: (0, 0, 0), 1: (106, 153, 78), 2: (232, 168, 56), 3: (193, 69, 69)}

_CITATION = """
@misc{wang2026funpiq,
  title={FunPiQ},
  author={Wang, Pengwei and Morano, Jos{\\'e} and Mares, Virginia and Bogunovi{\\'c}, Hrvoje},
  year={2026},
  note={MICCAI 2026 (paper 3819); arXiv:2606.25915}
}
"""


def read_mask(path) -> np.ndarray:
  """(H, W) uint8 class indices 0..3 from a FunPiQ annotation PNG."""
  with Image.open(path) as im:
    mode = im.mode
    arr = np.array(im)  # palette images give their indices
  if mode in ("P", "L"):
    idx = arr.astype(np.uint8)
  elif mode in ("RGB", "RGBA"):
    rgb = arr[..., :3]
    idx = np.full(rgb.shape[:2], 255, np.uint8)
    for k, colour in PALETTE.items():
      idx[np.all(rgb == colour, axis=-1)] = k
    if (idx == 255).any():
      odd = {tuple(c) for c in rgb[idx == 255][:5]}
      raise common.DataLayoutError(
          f"{path}: colours {odd} are not FunPiQ classes {PALETTE}")
  else:
    raise common.DataLayoutError(f"{path}: unsupported mask mode {mode}")
  if idx.max(initial=0) >= len(CLASS_NAMES):
    raise common.DataLayoutError(
        f"{path}: class index {int(idx.max())} > {len(CLASS_NAMES) - 1}")
  return idx


class Builder(tfds.core.GeneratorBasedBuilder):
  """FunPiQ images with per-pixel good/usable/bad quality masks."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release (FunPiQ annotations v1.0.0)."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  1. Download the FunPiQ annotation PNGs (GitHub release v1.0.0 of the FunPiQ
     repository, or Zenodo record 21838047) into
       <manual_dir>/annotations/   (any nesting; one palette PNG per image)
  2. Put the matching photographs, named as in the annotations (same stem),
     into
       <manual_dir>/images/        (any nesting, e.g. images/eyeq/,
                                    images/brset/, images/mbrset/)
     EyeQ images must be the output of EyeQ's preprocessing script; BRSET
     (PhysioNet 1.0.1) and mBRSET (PhysioNet 1.0) images are used as shipped.
     The first folder below images/ is stored as `source`.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=common.image_features(mask=common.mask_feature(),
                                       source=tfds.features.Text()),
        supervised_keys=("image", "mask"),
        homepage="https://arxiv.org/abs/2606.25915",
        citation=_CITATION,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = common.local(dl_manager.manual_dir)
    ann = common.find_dir(root, ["annotations"])
    images = common.find_dir(root, ["images"])
    return {"test": self._generate_examples(ann, images)}

  def _generate_examples(self, ann_dir, image_dir):
    masks = sorted(p for p in common.list_images(ann_dir)
                   if p.suffix.lower() == ".png")
    if not masks:
      raise common.DataLayoutError(f"{ann_dir} holds no PNG annotations")
    images = common.match_images([m.stem for m in masks], image_dir)
    for mask_path, image_path in zip(masks, images):
      mask = read_mask(mask_path)
      with Image.open(image_path) as im:
        w, h = im.size
      mh, mw = mask.shape
      if abs(w / h - mw / mh) > 0.01:
        raise common.DataLayoutError(
            f"{image_path} is {w}x{h} but its annotation {mask_path} is "
            f"{mw}x{mh} (different aspect): for EyeQ use the images written by "
            "EyeQ's preprocessing script")
      rel = image_path.relative_to(image_dir).parts
      yield mask_path.stem, common.image_example(
          image_path, mask=common.mask_png(mask),
          source=rel[0] if len(rel) > 1 else "")
