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
  camera:     CAMERA_COLUMNS, values/names CAMERA_ALIASES; without a camera
              column it comes from the sheet name (workbooks with several
              sheets), else the table's file name, else the folder the image
              sits in (e.g. `CFP/`, `Portable/`, `UWF/`).
Every .csv/.xlsx under the manual dir and every non-empty sheet is read; an
image labelled twice is an error.
The figshare release was not available while this was written, so these
aliases cover the names the paper uses; an unmatched column or value stops
the build with an error that lists what the table holds.
"""
from __future__ import annotations

import dataclasses

try:
  from .. import _common as common
except ImportError:  # `tfds build data/<name>` puts data/ itself on sys.path
  import _common as common  # pylint: disable=import-error

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
    <manual_dir>/**/<labels>.xlsx|.csv   the quality table(s): one row per
                                         image, all sheets read
    <manual_dir>/**/<images>             any folders, e.g. CFP/, Portable/, UWF/
  The table needs an image-name column and an overall-quality column (1 good,
  0 poor); the camera type comes from a camera column, or the sheet / file
  name, or the image's folder name. See the module docstring for the accepted column names.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=common.image_features(
            quality=tfds.features.ClassLabel(names=QUALITY_NAMES),
            camera=tfds.features.ClassLabel(names=CAMERA_NAMES)),
        supervised_keys=("image", "quality"),
        homepage="https://doi.org/10.1038/s41597-023-02188-x",
        citation=_CITATION,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = common.local(dl_manager.manual_dir)
    files = sorted(p for p in root.rglob("*")
                   if p.suffix.lower() in (".csv", ".xlsx") and p.is_file()
                   and not p.name.startswith((".", "~$")))
    if not files:
      raise common.DataLayoutError(f"no .csv/.xlsx label table under {root}")
    return {"train": self._generate_examples(root, files)}

  def _collect(self, root, table, where, header, rows, table_cam, index,
               problems, records):
    image_col = common.pick_column(where, header, IMAGE_COLUMNS)
    quality_col = common.pick_column(where, header, QUALITY_COLUMNS)
    camera_col = common.pick_column(where, header, CAMERA_COLUMNS, required=False)
    for row in rows:
      name = row[image_col]
      if not name:
        problems.append(f"{where}: row without an image name: {row}")
        continue
      quality = quality_of(row[quality_col])
      if quality is None:
        problems.append(f"{where}: {name}: quality {row[quality_col]!r} not in "
                        f"{sorted(QUALITY_VALUES)}")
        continue
      cam = camera_of(row[camera_col]) if camera_col else table_cam
      if camera_col and cam is None:
        problems.append(f"{where}: {name}: camera {row[camera_col]!r} not one "
                        f"of {CAMERA_ALIASES}")
        continue
      # A name with folders is a path relative to the table (or manual dir).
      direct = [d / name for d in (table.parent, root) if (d / name).is_file()]
      hits = direct[:1] or index.get(common.stem_of(name), [])
      if len(hits) > 1 and cam is not None:
        hits = [h for h in hits if camera_from_path(h, root) == cam]
      if len(hits) != 1:
        problems.append(f"{where}: {name}: {len(hits)} matching image files")
        continue
      path = hits[0]
      if cam is None:
        cam = camera_from_path(path, root)
        if cam is None:
          problems.append(f"{where}: {name}: no camera column, and neither the "
                          f"table nor folder {path.parent.relative_to(root)} "
                          "names a camera")
          continue
      records.append((path, quality, cam))

  def _generate_examples(self, root, files):
    index = common.index_by_stem(common.list_images(root))
    problems, records, seen = [], [], {}
    for table in files:
      sheets = common.read_tables(table)
      for sheet, header, rows in sheets:
        where = f"{table.name}[{sheet}]" if len(sheets) > 1 else table.name
        # Camera when the table has no camera column: the sheet's name (in a
        # workbook with several sheets) or the table file's name.
        table_cam = (camera_of(sheet) if len(sheets) > 1 else None) or camera_of(
            table.stem)
        self._collect(root, table, where, header, rows, table_cam, index,
                      problems, records)
    for path, *_ in records:
      seen[path] = seen.get(path, 0) + 1
    problems += [f"{p.relative_to(root)} is labelled {n} times"
                 for p, n in seen.items() if n > 1]
    if problems:
      raise common.DataLayoutError(
          f"{len(problems)} label row(s) could not be used:\n  " +
          "\n  ".join(problems[:20]))
    for path, quality, cam in records:
      if cam == "uwf" and not self.builder_config.include_uwf:
        continue  # the documented purpose of the no_uwf config
      yield path.relative_to(root).as_posix(), common.image_example(
          path, quality=quality, camera=cam)
