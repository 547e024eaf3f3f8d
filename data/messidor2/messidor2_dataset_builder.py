"""Messidor-2 (Decenciere et al. 2014; Abramoff et al. 2013): good images.

EFIQA trains its vessel-inpainting teacher (VUAD) on Messidor-2 as a set of
good-quality photographs, after removing images without a full vascular
structure (the reference list `src/vuad/config/Messidor_NSFS.txt`).

Build (from the repository root):

  tfds build data/messidor2 --manual_dir=/path/to/messidor2 \
      --file_format=array_record
  tfds build data/messidor2 --config=excluded --manual_dir=/path/to/messidor2 \
      --file_format=array_record

  Or, without the tfds CLI (which in tensorflow-datasets 4.9.10 needs
  apache_beam): python -m data.build messidor2 --manual_dir=...

Configs:
  all (default): every image under IMAGES/ (1,748).
  excluded: every image except those listed in
      <manual_dir>/Messidor_NSFS.txt (one image id per line, with or without
      extension; blank lines and `#` comments ignored). An id that matches
      no image stops the build (a list for another copy of the data).
No labels: one split `train`, features image, image/filename, id (stem).
"""
from __future__ import annotations

import dataclasses

try:
  from .. import _common as common
except ImportError:  # `tfds build data/<name>` puts data/ itself on sys.path
  import _common as common  # pylint: disable=import-error

import tensorflow_datasets as tfds

EXCLUSION_FILE = "Messidor_NSFS.txt"

_CITATION = """
@article{decenciere2014feedback,
  title={Feedback on a publicly distributed image database: the Messidor database},
  author={Decenci{\\`e}re, Etienne and Zhang, Xiwei and Cazuguel, Guy and Lay, Bruno and Cochener, B{\\'e}atrice and Trone, Caroline and Gain, Philippe and Ordonez, Richard and Massin, Pascale and Erginay, Ali and others},
  journal={Image Analysis \\& Stereology},
  volume={33},
  number={3},
  pages={231--234},
  year={2014}
}
"""


@dataclasses.dataclass
class Messidor2Config(tfds.core.BuilderConfig):
  exclusion_file: str | None = None


def read_exclusions(path) -> set[str]:
  ids = set()
  for line in common.local(path).read_text(encoding="utf-8-sig").splitlines():
    line = line.split("#", 1)[0].strip()
    if line:
      ids.add(line)
  return ids


class Builder(tfds.core.GeneratorBasedBuilder):
  """Messidor-2 photographs (the teacher's good-quality training set)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      Messidor2Config(name="all", description="All Messidor-2 images."),
      Messidor2Config(name="excluded", exclusion_file=EXCLUSION_FILE,
                      description=f"Without the ids in {EXCLUSION_FILE}."),
  ]
  DEFAULT_CONFIG_NAME = "all"
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  Messidor-2 is distributed by ADCIS under a licence agreement
  (adcis.net/en/third-party/messidor2/). Extract the image archive so that
    <manual_dir>/IMAGES/*.png, *.JPG
  For the `excluded` config also place the exclusion list (one image id per
  line, e.g. EFIQA's src/vuad/config/Messidor_NSFS.txt) at
    <manual_dir>/{EXCLUSION_FILE}
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=common.image_features(id=tfds.features.Text()),
        homepage="https://www.adcis.net/en/third-party/messidor2/",
        citation=_CITATION,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = common.local(dl_manager.manual_dir)
    images = common.find_dir(root, ["IMAGES"])
    excluded = set()
    if self.builder_config.exclusion_file:
      excluded = read_exclusions(
          common.find_file(root, [self.builder_config.exclusion_file]))
    return {"train": self._generate_examples(images, excluded)}

  def _generate_examples(self, images, excluded):
    paths = common.list_images(images)
    if not paths:
      raise common.DataLayoutError(f"{images} holds no images")
    keys = {}
    for p in paths:
      keys[p.name.lower()] = p
      keys.setdefault(p.stem.lower(), p)
    unmatched = sorted(e for e in excluded if e.lower() not in keys)
    if unmatched:
      raise common.DataLayoutError(
          f"{len(unmatched)} excluded id(s) match no image in {images}: "
          f"{unmatched[:10]}")
    drop = {keys[e.lower()] for e in excluded}
    for p in paths:
      if p in drop:
        continue
      yield p.name, common.image_example(p, id=p.stem)
