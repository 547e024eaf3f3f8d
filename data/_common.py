"""Shared helpers for the TFDS builders in `data/`.

Every builder here reads a user's manual download (nothing can be fetched
automatically: the datasets need registration or licence agreements) and
writes ArrayRecord files that `tfds.data_source` / grain read without
TensorFlow.

Images are stored as their original encoded bytes when they are 8-bit RGB
JPEG or PNG files, so datasets stay compact and downstream code decodes them
itself (`decoders={"image": tfds.decode.SkipDecoding()}` gives the bytes).
Anything else (TIFF, GIF, greyscale, RGBA, 16-bit) is converted once to an
RGB PNG, which is lossless for 8-bit input. Masks are stored as single-channel
PNGs of class indices (never as palette PNGs: OpenCV, which TFDS prefers for
decoding when installed, expands palettes to colours).

Builders load this module by file path (see `load_common` in each builder),
so it works both when `data` is imported as a package (tests) and under the
`tfds build data/<name>` CLI, which imports `<name>.<name>_dataset_builder`
with `data/` on sys.path.
"""
from __future__ import annotations

import collections
import csv
import io
import os
import pathlib
from typing import Iterable, Mapping, Sequence

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".gif")
# Formats kept byte-for-byte (TFDS decodes both with PIL or OpenCV).
_KEEP_FORMATS = ("JPEG", "PNG")


class DataLayoutError(ValueError):
  """The manual directory does not match the documented layout."""


def rgb_image_feature() -> tfds.features.Image:
  # encoding_format=None: bytes given to the feature are stored unchanged.
  return tfds.features.Image(shape=(None, None, 3), dtype=np.uint8)


def mask_feature() -> tfds.features.Image:
  """A (H, W, 1) uint8 class-index mask stored as a greyscale PNG."""
  return tfds.features.Image(shape=(None, None, 1), dtype=np.uint8,
                             encoding_format="png", use_colormap=True)


def image_features(**extra) -> tfds.features.FeaturesDict:
  """What every builder here stores, `image` (see rgb_bytes) and
  `image/filename`, then the dataset's own features."""
  return tfds.features.FeaturesDict({
      "image": rgb_image_feature(),
      "image/filename": tfds.features.Text(),
      **extra,
  })


def image_example(path: pathlib.Path, **extra) -> dict:
  """An example of `image_features`: the photograph at `path`, then `extra`."""
  return {"image": rgb_bytes(path), "image/filename": path.name, **extra}


def is_image_file(path: pathlib.Path) -> bool:
  return path.is_file() and path.suffix.lower() in IMAGE_EXTS and (
      not path.name.startswith("."))


def local(path) -> pathlib.Path:
  """A plain pathlib.Path (TFDS hands out etils paths, whose glob is limited)."""
  return pathlib.Path(os.fspath(path))


def list_images(root: pathlib.Path, recursive: bool = True) -> list[pathlib.Path]:
  root = local(root)
  it = root.rglob("*") if recursive else root.iterdir()
  return sorted(p for p in it if is_image_file(p))


def index_by_stem(paths: Iterable[pathlib.Path]) -> dict[str, list[pathlib.Path]]:
  index: dict[str, list[pathlib.Path]] = collections.defaultdict(list)
  for p in paths:
    index[p.stem].append(p)
  return dict(index)


def stem_of(name: str) -> str:
  """`10_left.jpeg` -> `10_left`; `242.3` (no image extension) stays."""
  base = os.path.basename(name.strip())
  root, ext = os.path.splitext(base)
  return root if ext.lower() in IMAGE_EXTS else base


def resolve_images(names: Sequence[str], index: Mapping[str, list[pathlib.Path]],
                   where: str) -> list[pathlib.Path]:
  """Maps label-file image names to files by stem; errors list every problem."""
  found, missing, ambiguous = [], [], []
  for name in names:
    hits = index.get(stem_of(name), [])
    if len(hits) == 1:
      found.append(hits[0])
    elif not hits:
      missing.append(name)
    else:
      ambiguous.append(f"{name}: {', '.join(str(h) for h in hits)}")
  problems = []
  if missing:
    problems.append(f"{len(missing)} image(s) named in the labels are not "
                    f"under {where}: {_head(missing)}")
  if ambiguous:
    problems.append(f"{len(ambiguous)} name(s) match several files under "
                    f"{where} (keep one copy): {_head(ambiguous)}")
  if problems:
    raise DataLayoutError("\n".join(problems))
  return found


def match_images(names: Sequence[str], root: pathlib.Path) -> list[pathlib.Path]:
  """The images under `root` (any depth) named by `names`, matched by stem."""
  return resolve_images(names, index_by_stem(list_images(root)), str(root))


def _head(items: Sequence[str], n: int = 10) -> str:
  shown = ", ".join(items[:n])
  return shown + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def rgb_bytes(path: pathlib.Path) -> bytes:
  """The file's bytes if it is an 8-bit RGB JPEG/PNG, else an RGB PNG."""
  with Image.open(path) as im:
    if im.format in _KEEP_FORMATS and im.mode == "RGB":
      return path.read_bytes()
    if im.mode in ("I;16", "I;16B", "I", "F"):
      raise DataLayoutError(f"{path}: {im.mode} (high bit depth) images are "
                            "not supported; convert to 8-bit RGB first")
    rgb = im.convert("RGB")
  buf = io.BytesIO()
  rgb.save(buf, format="PNG")
  return buf.getvalue()


def mask_png(mask: np.ndarray) -> bytes:
  """Encodes a (H, W) uint8 class-index array as a greyscale PNG."""
  mask = np.asarray(mask)
  if mask.ndim != 2 or mask.dtype != np.uint8:
    raise ValueError(f"mask must be (H, W) uint8, got {mask.shape} {mask.dtype}")
  buf = io.BytesIO()
  Image.fromarray(mask, mode="L").save(buf, format="PNG")
  return buf.getvalue()


def binary_mask(path: pathlib.Path) -> np.ndarray:
  """Reads a binary mask (GIF/PNG/TIF, 0 vs non-zero) as (H, W) uint8 0/1."""
  with Image.open(path) as im:
    arr = np.asarray(im.convert("L"))
  return (arr > 0).astype(np.uint8)


def read_csv(path: pathlib.Path) -> tuple[list[str], list[dict[str, str]]]:
  """Reads a CSV (UTF-8, optional BOM) into its header and rows."""
  with open(path, newline="", encoding="utf-8-sig") as f:
    reader = csv.DictReader(f)
    header = [h.strip() for h in (reader.fieldnames or [])]
    rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()}
            for row in reader]
  return header, rows


def require_columns(path: pathlib.Path, header: Sequence[str],
                    needed: Sequence[str]) -> None:
  missing = [c for c in needed if c not in header]
  if missing:
    raise DataLayoutError(f"{path} lacks column(s) {missing}; it has {list(header)}")


def find_file(root: pathlib.Path, names: Sequence[str]) -> pathlib.Path:
  """The first of `names` present in `root` (case-insensitive)."""
  root = local(root)
  entries = {p.name.lower(): p for p in root.iterdir()}
  for n in names:
    if n.lower() in entries:
      return entries[n.lower()]
  raise DataLayoutError(f"none of {list(names)} found in {root}; it holds "
                        f"{sorted(p.name for p in root.iterdir())[:20]}")


def find_dir(root: pathlib.Path, names: Sequence[str],
             required: bool = True) -> pathlib.Path | None:
  """The first of the folders `names` present in `root` (case-insensitive)."""
  root = local(root)
  entries = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
  for n in names:
    if n.lower() in entries:
      return entries[n.lower()]
  if required:
    raise DataLayoutError(f"none of the folders {list(names)} found in {root}")
  return None


def find_root(manual_dir, folders: Sequence[str]) -> pathlib.Path:
  """The manual dir, or its one sub-folder, that holds all of `folders`
  (case-insensitive): archives often add a folder level (DRIVE/, DRIMDB/)."""
  manual_dir = local(manual_dir)
  has_all = lambda d: all(find_dir(d, [f], required=False) for f in folders)
  if has_all(manual_dir):
    return manual_dir
  subs = sorted(p for p in manual_dir.iterdir() if p.is_dir() and has_all(p))
  if len(subs) == 1:
    return subs[0]
  wanted = " and ".join(f"{f}/" for f in folders)
  if not subs:
    raise DataLayoutError(f"no {wanted} in {manual_dir} or one sub-folder of it")
  raise DataLayoutError(f"several sub-folders of {manual_dir} hold {wanted} "
                        f"(keep one): {_head([p.name for p in subs])}")


def read_xlsx(path: pathlib.Path) -> list[tuple[str, list[str], list[dict[str, str]]]]:
  """Reads every worksheet of an .xlsx file (no openpyxl needed).

  Returns (sheet name, header, rows) per non-empty sheet, in workbook order.
  Only cell values are read (shared strings, inline strings, numbers); the
  first row of a sheet is its header. Numbers keep Excel's text ("1", "0.5").
  """
  import re
  import xml.etree.ElementTree as ET
  import zipfile
  main = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
  rel_ns = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
  ns = {"m": main}
  with zipfile.ZipFile(path) as z:
    names = z.namelist()
    shared = []
    if "xl/sharedStrings.xml" in names:
      for si in ET.fromstring(z.read("xl/sharedStrings.xml")).findall("m:si", ns):
        shared.append("".join(t.text or "" for t in si.iter(f"{{{main}}}t")))
    sheets = []  # (name, member)
    if "xl/workbook.xml" in names and "xl/_rels/workbook.xml.rels" in names:
      rels = {r.get("Id"): r.get("Target") for r in
              ET.fromstring(z.read("xl/_rels/workbook.xml.rels"))}
      for sh in ET.fromstring(z.read("xl/workbook.xml")).iter(f"{{{main}}}sheet"):
        target = rels[sh.get(f"{{{rel_ns}}}id")].lstrip("/")
        sheets.append((sh.get("name"), target if target.startswith("xl/")
                       else "xl/" + target))
    else:
      members = sorted((n for n in names
                        if re.fullmatch(r"xl/worksheets/sheet\d+\.xml", n)),
                       key=lambda n: int(re.findall(r"\d+", n)[-1]))
      sheets = [(pathlib.PurePosixPath(n).stem, n) for n in members]
    if not sheets:
      raise DataLayoutError(f"{path}: no worksheet found")
    xml = {name: ET.fromstring(z.read(member)) for name, member in sheets}
  out = []
  for name, sheet in xml.items():
    table = []
    for row in sheet.iter(f"{{{main}}}row"):
      cells = {}
      for c in row.findall("m:c", ns):
        ref = re.match(r"[A-Z]+", c.get("r", ""))
        kind = c.get("t")
        if kind == "inlineStr":
          val = "".join(t.text or "" for t in c.iter(f"{{{main}}}t"))
        else:
          v = c.find("m:v", ns)
          val = "" if v is None or v.text is None else v.text
          if kind == "s" and val:
            val = shared[int(val)]
        cells[_col_index(ref.group(0)) if ref else len(cells)] = val.strip()
      if any(cells.values()):
        table.append([cells.get(i, "") for i in range(max(cells) + 1)])
    if table:
      header = table[0]
      rows = [dict(zip(header, r + [""] * (len(header) - len(r))))
              for r in table[1:]]
      out.append((name, header, rows))
  if not out:
    raise DataLayoutError(f"{path}: every worksheet is empty")
  return out


def _col_index(col: str) -> int:
  n = 0
  for ch in col:
    n = n * 26 + (ord(ch) - ord("A") + 1)
  return n - 1


def read_tables(path: pathlib.Path) -> list[tuple[str, list[str], list[dict[str, str]]]]:
  """(name, header, rows) per table: one for a CSV, one per sheet for XLSX."""
  path = local(path)
  if path.suffix.lower() == ".xlsx":
    return read_xlsx(path)
  if path.suffix.lower() == ".csv":
    return [(path.stem, *read_csv(path))]
  raise DataLayoutError(f"{path}: label tables must be .csv or .xlsx")


def norm_key(text: str) -> str:
  """Lower-case alphanumerics only: `Overall Quality` -> `overallquality`."""
  return "".join(ch for ch in text.lower() if ch.isalnum())


def pick_column(path, header: Sequence[str], aliases: Sequence[str],
                required: bool = True) -> str | None:
  """The header entry whose normalised form is the first matching alias."""
  normed = {norm_key(h): h for h in header}
  for a in aliases:
    if norm_key(a) in normed:
      return normed[norm_key(a)]
  if required:
    raise DataLayoutError(f"{path}: no column named any of {list(aliases)}; "
                          f"it has {list(header)}")
  return None
