"""MSHF (Jin et al. 2023, Sci Data): multi-source fundus images, binary quality.

1,302 images from three camera types: tabletop colour fundus photography
(500), a portable camera (302) and ultra-widefield (UWF, 500), each with an
overall quality grade by three ophthalmologists (good / poor).

Build (from the repository root):

  tfds build data/mshf --manual_dir=/path/to/MSHF --file_format=array_record
  tfds build data/mshf --config=all --manual_dir=/path/to/MSHF \
      --file_format=array_record

  Or, without the tfds CLI (which in tensorflow-datasets 4.9.10 needs
  apache_beam): python -m data.build mshf --manual_dir=...

Configs:
  no_uwf (default): tabletop + portable, 802 images (the EFIQA protocol).
  all: every image, UWF included.

Column mapping (explicit, matched after lower-casing and dropping
non-alphanumerics, first alias present wins):
  image name: IMAGE_COLUMNS
  quality:    QUALITY_COLUMNS, values QUALITY_VALUES (1 = good, 0 = poor)
  camera:     CAMERA_COLUMNS, values/folder names CAMERA_ALIASES; when the
              table has no camera column, the camera comes from the folder
              the image sits in (e.g. `CFP/`, `Portable/`, `UWF/`).
The figshare release was not available while this was written, so these
aliases cover the names the paper uses; an unmatched column or value stops
the build with an error that lists what the table holds.
"""
from __future__ import annotations

import dataclasses

try:
  from .. import _common as common
except ImportError:
  # `tfds build data/<name>` imports `<name>.<name>_dataset_builder` with
  # data/ on sys.path, so there is no parent package: load by file path.
  import importlib.util
  import pathlib
  import sys
  common = sys.modules.get("efiqa_data_common")
  if common is None:
    _spec = importlib.util.spec_from_file_location(
        "efiqa_data_common",
        pathlib.Path(__file__).resolve().parents[1] / "_common.py")
    common = importlib.util.module_from_spec(_spec)
    sys.modules["efiqa_data_common"] = common
    _spec.loader.exec_module(common)

import tensorflow_datasets as tfds

QUALITY_NAMES = ("good", "bad")        # label 1 = low quality, as in EFIQA
CAMERA_NAMES = ("tabletop", "portable", "uwf")

IMAGE_COLUMNS = ("image", "image_name", "imagename", "name", "filename",
                 "file_name", "file", "img", "id")
QUALITY_COLUMNS = ("overall_quality", "overall quality", "overall",
                   "quality", "label", "gradable")
CAMERA_COLUMNS = ("camera", "camera_type", "device", "modality", "type",
                  "source")
QUALITY_VALUES = {"1": 0, "good": 0, "yes": 0, "gradable": 0, "high": 0,
                  "0": 1, "bad": 1, "poor": 1, "no": 1, "ungradable": 1,
                  "low": 1}
CAMERA_ALIASES = {
    "tabletop": ("cfp", "tabletop", "desktop", "colorfundus", "colourfundus"),
    "portable": ("portable", "handheld"),
    "uwf": ("uwf", "ultrawidefield", "ultrawide", "widefield"),
}

_CITATION = """
@article{jin2023mshf,
  title={MSHF: A Multi-Source Heterogeneous Fundus (MSHF) Dataset for Image Quality Assessment},
  author={Jin, Kai and Gao, Zhiyuan and Jiang, Xiaoyu and Wang, Yaqi and Ma, Xiaoyu and Li, Yunxiang and Ye, Juan},
  journal={Scientific Data},
  year={2023},
  doi={10.1038/s41597-023-02188-x}
}
"""


@dataclasses.dataclass
class MshfConfig(tfds.core.BuilderConfig):
  include_uwf: bool = False


def camera_of(text: str) -> str | None:
  key = common.norm_key(text)
  if not key:
    return None
  for cam, aliases in CAMERA_ALIASES.items():
    if any(key == a or key.startswith(a) for a in aliases):
      return cam
  return None


def camera_from_path(path, root) -> str | None:
  cams = {camera_of(p) for p in path.relative_to(root).parts[:-1]} - {None}
  return cams.pop() if len(cams) == 1 else None


def quality_of(value: str) -> int | None:
  v = value.strip().lower()
  if v.endswith(".0"):
    v = v[:-2]
  return QUALITY_VALUES.get(v)


class Builder(tfds.core.GeneratorBasedBuilder):
  """MSHF binary image quality with camera type."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      MshfConfig(name="no_uwf", include_uwf=False,
                 description="Tabletop and portable images (EFIQA protocol)."),
      MshfConfig(name="all", include_uwf=True, description="All images."),
  ]
  DEFAULT_CONFIG_NAME = "no_uwf"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download MSHF from figshare (linked from the Sci Data paper,
  doi:10.1038/s41597-023-02188-x) and extract it into the manual dir:
    <manual_dir>/<labels>.xlsx or .csv   the quality table (one row per
                                         image; exactly one table file)
    <manual_dir>/**/<images>             any folders, e.g. CFP/, Portable/, UWF/
  The table needs an image-name column and an overall-quality column (1 good,
  0 poor); the camera type comes from a camera column or from the image's
  folder name. See the module docstring for the accepted column names.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": common.rgb_image_feature(),
            "image/filename": tfds.features.Text(),
            "quality": tfds.features.ClassLabel(names=QUALITY_NAMES),
            "camera": tfds.features.ClassLabel(names=CAMERA_NAMES),
        }),
        supervised_keys=("image", "quality"),
        homepage="https://doi.org/10.1038/s41597-023-02188-x",
        citation=_CITATION,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = common.local(dl_manager.manual_dir)
    tables = sorted(p for p in root.rglob("*")
                    if p.suffix.lower() in (".csv", ".xlsx") and p.is_file()
                    and not p.name.startswith((".", "~$")))
    if len(tables) != 1:
      raise common.DataLayoutError(
          f"expected exactly one .csv/.xlsx label table under {root}, found "
          f"{[str(t) for t in tables]}")
    return {"train": self._generate_examples(root, tables[0])}

  def _generate_examples(self, root, table):
    header, rows = common.read_table(table)
    image_col = common.pick_column(table, header, IMAGE_COLUMNS)
    quality_col = common.pick_column(table, header, QUALITY_COLUMNS)
    camera_col = common.pick_column(table, header, CAMERA_COLUMNS, required=False)
    index = common.index_by_stem(common.list_images(root))
    problems, records = [], []
    for row in rows:
      name = row[image_col]
      quality = quality_of(row[quality_col])
      if quality is None:
        problems.append(f"{name}: quality {row[quality_col]!r} not in "
                        f"{sorted(QUALITY_VALUES)}")
        continue
      cam = camera_of(row[camera_col]) if camera_col else None
      if camera_col and cam is None:
        problems.append(f"{name}: camera {row[camera_col]!r} not one of "
                        f"{CAMERA_ALIASES}")
        continue
      # A name with folders is a path relative to the table (or manual dir).
      direct = [d / name for d in (table.parent, root) if (d / name).is_file()]
      hits = direct[:1] or index.get(common.stem_of(name), [])
      if len(hits) > 1 and cam is not None:
        hits = [h for h in hits if camera_from_path(h, root) == cam]
      if len(hits) != 1:
        problems.append(f"{name}: {len(hits)} matching image files")
        continue
      path = hits[0]
      if cam is None:
        cam = camera_from_path(path, root)
        if cam is None:
          problems.append(f"{name}: no camera column and folder "
                          f"{path.parent.relative_to(root)} names no camera")
          continue
      records.append((path, quality, cam))
    if problems:
      raise common.DataLayoutError(
          f"{table}: {len(problems)} row(s) could not be used:\n  " +
          "\n  ".join(problems[:20]))
    for path, quality, cam in records:
      if cam == "uwf" and not self.builder_config.include_uwf:
        continue  # the documented purpose of the no_uwf config
      yield path.relative_to(root).as_posix(), {
          "image": common.rgb_bytes(path),
          "image/filename": path.name,
          "quality": quality,
          "camera": cam,
      }
