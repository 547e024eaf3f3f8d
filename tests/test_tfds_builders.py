"""Builds every TFDS builder in data/ from a tiny fixture tree laid out like
the real download, then reads it back with `tfds.data_source` (ArrayRecord,
no tf.data) and checks labels and masks exactly."""
import csv
import io
import pathlib
import sys

import numpy as np
from PIL import Image
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

import tensorflow_datasets as tfds  # noqa: E402

from data import _common  # noqa: E402
from data.drimdb import drimdb_dataset_builder as drimdb  # noqa: E402
from data.drive import drive_dataset_builder as drive  # noqa: E402
from data.efiqa_synth import efiqa_synth_dataset_builder as synth  # noqa: E402
from data.eyeq import eyeq_dataset_builder as eyeq  # noqa: E402
from data.funpiq import funpiq_dataset_builder as funpiq  # noqa: E402
from data.mbrset import mbrset_dataset_builder as mbrset  # noqa: E402
from data.messidor2 import messidor2_dataset_builder as messidor2  # noqa: E402
from data.mshf import mshf_dataset_builder as mshf  # noqa: E402


# ---------------------------------------------------------------- fixtures

def _rgb(seed, size=(12, 10)):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)


def write_image(path, seed, fmt=None, mode="RGB", size=(12, 10)):
  """Writes a tiny image; returns the pixels a reader must get back."""
  path.parent.mkdir(parents=True, exist_ok=True)
  arr = _rgb(seed, size)
  im = Image.fromarray(arr)
  if mode != "RGB":
    im = im.convert(mode)
  im.save(path, format=fmt)
  with Image.open(path) as back:
    return np.asarray(back.convert("RGB"))


def write_csv(path, header, rows):
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)


def build(builder_cls, manual_dir, data_dir, config=None):
  builder = builder_cls(data_dir=str(data_dir), config=config)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)),
      file_format="array_record")
  name = builder.name + (f"/{config}" if config else "")
  return builder, name


def read(name, data_dir, split, raw_image=False):
  decoders = {"image": tfds.decode.SkipDecoding()} if raw_image else None
  ds = tfds.data_source(name, split=split, data_dir=str(data_dir),
                        download=False, decoders=decoders)
  return [ds[i] for i in range(len(ds))]


def by_file(examples):
  return {ex["image/filename"].decode() if isinstance(ex["image/filename"], bytes)
          else ex["image/filename"]: ex for ex in examples}


# ---------------------------------------------------------------- EyeQ

def test_eyeq(tmp_path):
  m = tmp_path / "manual"
  px = {
      "10_left": write_image(m / "train" / "10_left.jpeg", 1, "JPEG"),
      "10_right": write_image(m / "train" / "sub" / "10_right.jpeg", 2, "JPEG"),
      "1_left": write_image(m / "test" / "1_left.png", 3, "PNG"),  # preprocessed
      "2_right": write_image(m / "test" / "2_right.jpeg", 4, "JPEG"),
      "3_left": write_image(m / "test" / "3_left.jpeg", 5, "JPEG"),
  }
  header = ["", "image", "quality", "DR_grade"]
  write_csv(m / "Label_EyeQ_train.csv", header,
            [[0, "10_left.jpeg", 0, 0], [1, "10_right.jpeg", 2, 3]])
  write_csv(m / "Label_EyeQ_test.csv", header,
            [[0, "1_left.jpeg", 1, 4], [1, "2_right.jpeg", 0, 1],
             [2, "3_left.jpeg", 2, 0]])
  _, name = build(eyeq.Builder, m, tmp_path / "tfds")
  train = by_file(read(name, tmp_path / "tfds", "train"))
  test = by_file(read(name, tmp_path / "tfds", "test"))
  assert {k: (v["quality"], v["dr_grade"]) for k, v in train.items()} == {
      "10_left.jpeg": (0, 0), "10_right.jpeg": (2, 3)}
  assert {k: (v["quality"], v["dr_grade"]) for k, v in test.items()} == {
      "1_left.png": (1, 4), "2_right.jpeg": (0, 1), "3_left.jpeg": (2, 0)}
  np.testing.assert_array_equal(test["1_left.png"]["image"], px["1_left"])
  np.testing.assert_array_equal(train["10_left.jpeg"]["image"], px["10_left"])
  # Encoded bytes are stored unchanged (our own decoder reads them).
  raw = by_file(read(name, tmp_path / "tfds", "train", raw_image=True))
  assert raw["10_right.jpeg"]["image"] == (m / "train/sub/10_right.jpeg").read_bytes()


def test_eyeq_missing_image_is_an_error(tmp_path):
  m = tmp_path / "manual"
  write_image(m / "train" / "10_left.jpeg", 1, "JPEG")
  header = ["", "image", "quality", "DR_grade"]
  write_csv(m / "Label_EyeQ_train.csv", header,
            [[0, "10_left.jpeg", 0, 0], [1, "99_right.jpeg", 1, 0]])
  write_csv(m / "Label_EyeQ_test.csv", header, [])
  with pytest.raises(_common.DataLayoutError, match="99_right.jpeg"):
    build(eyeq.Builder, m, tmp_path / "tfds")


# ---------------------------------------------------------------- DRIMDB

@pytest.mark.parametrize("config,expected", [
    ("good_bad", {"g1.jpg": 0, "g2.jpg": 0, "b1.jpg": 1}),
    ("all", {"g1.jpg": 0, "g2.jpg": 0, "b1.jpg": 1, "o1.jpg": 2}),
])
def test_drimdb(tmp_path, config, expected):
  m = tmp_path / "manual"
  d = m / "DRIMDB"   # the Kaggle archive adds one folder level
  write_image(d / "Good" / "g1.jpg", 1, "JPEG")
  write_image(d / "Good" / "g2.jpg", 2, "JPEG")
  px = write_image(d / "Bad" / "b1.jpg", 3, "JPEG")
  write_image(d / "Outlier" / "o1.jpg", 4, "JPEG")
  builder, name = build(drimdb.Builder, m, tmp_path / "tfds", config)
  got = by_file(read(name, tmp_path / "tfds", "train"))
  assert {k: v["label"] for k, v in got.items()} == expected
  names = builder.info.features["label"].names
  assert names == (["good", "bad", "outlier"] if config == "all" else ["good", "bad"])
  np.testing.assert_array_equal(got["b1.jpg"]["image"], px)


# ---------------------------------------------------------------- MSHF

def write_xlsx(path, sheets):
  """A minimal .xlsx as Excel writes it: workbook + rels, shared strings,
  numbers; `sheets` maps sheet name -> (header, rows)."""
  import zipfile
  strings = []
  def cell(ref, v):
    if isinstance(v, (int, float)):
      return f'<c r="{ref}"><v>{v}</v></c>'
    strings.append(v)
    return f'<c r="{ref}" t="s"><v>{len(strings) - 1}</v></c>'
  ns = 'xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"'
  rns = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
  path.parent.mkdir(parents=True, exist_ok=True)
  with zipfile.ZipFile(path, "w") as z:
    entries, rels = [], []
    # Sheet files numbered in reverse, so only the workbook gives the order.
    for k, (name, (header, rows)) in enumerate(sheets.items(), start=1):
      xml_rows = []
      for i, r in enumerate(([header] + rows) if header else [], start=1):
        cells = "".join(cell(f"{chr(65 + j)}{i}", v) for j, v in enumerate(r))
        xml_rows.append(f'<row r="{i}">{cells}</row>')
      member = f"worksheets/sheet{len(sheets) + 1 - k}.xml"
      z.writestr("xl/" + member, f'<worksheet {ns}><sheetData>'
                 f'{"".join(xml_rows)}</sheetData></worksheet>')
      entries.append(f'<sheet name="{name}" sheetId="{k}" r:id="rId{k}"/>')
      rels.append(f'<Relationship Id="rId{k}" Target="{member}" Type="{rns}/worksheet"/>')
    z.writestr("xl/workbook.xml", f'<workbook {ns} xmlns:r="{rns}"><sheets>'
               f'{"".join(entries)}</sheets></workbook>')
    z.writestr("xl/_rels/workbook.xml.rels",
               '<Relationships xmlns="http://schemas.openxmlformats.org/package/'
               f'2006/relationships">{"".join(rels)}</Relationships>')
    z.writestr("xl/sharedStrings.xml", f'<sst {ns} count="{len(strings)}">' +
               "".join(f"<si><t>{s}</t></si>" for s in strings) + "</sst>")


def _mshf_tree(m, table):
  """MSHF-like tree; returns {relative path: (quality, camera, pixels)}."""
  px = {
      "CFP/1.jpg": write_image(m / "MSHF" / "CFP" / "1.jpg", 1, "JPEG"),
      # Same stem in another camera folder: only the camera tells them apart.
      "Portable camera/1.jpg": write_image(
          m / "MSHF" / "Portable camera" / "1.jpg", 2, "JPEG"),
      "Portable camera/7.png": write_image(
          m / "MSHF" / "Portable camera" / "7.png", 3, "PNG"),
      "UWF/u1.jpg": write_image(m / "MSHF" / "UWF" / "u1.jpg", 4, "JPEG"),
  }
  header = ["Image", "Illumination", "Clarity", "Contrast", "Overall quality"]
  if table == "csv":
    # Camera given as a column (it picks between the two 1.jpg files).
    write_csv(m / "labels.csv", header + ["Camera"], [
        ["1.jpg", 1, 1, 1, 1, "CFP"], ["7.png", 0, 1, 0, 0, "portable"],
        ["u1.jpg", 1, 1, 1, 1, "UWF"], ["1.jpg", 0, 0, 0, 0, "Portable"]])
  elif table == "xlsx":
    # No camera column: names are paths and the folders give the camera.
    write_xlsx(m / "MSHF" / "quality.xlsx", {"Sheet1": (header, [
        ["CFP/1.jpg", 1, 1, 1, 1], ["Portable camera/1.jpg", 0, 0, 0, 0],
        ["7.png", 0, 1, 0, 0], ["u1.jpg", 1, 1, 1, 1]])})
  else:
    # One sheet per camera (the sheet name picks between the two 1.jpg),
    # plus an empty sheet.
    write_xlsx(m / "MSHF" / "quality.xlsx", {
        "CFP": (header, [["1.jpg", 1, 1, 1, 1]]),
        "Portable": (header, [["1.jpg", 0, 0, 0, 0], ["7.png", 0, 1, 0, 0]]),
        "UWF": (header, [["u1.jpg", 1, 1, 1, 1]]),
        "Sheet4": (None, [])})
  labels = {"CFP/1.jpg": (0, 0), "Portable camera/1.jpg": (1, 1),
            "Portable camera/7.png": (1, 1), "UWF/u1.jpg": (0, 2)}
  return {k: labels[k] + (px[k],) for k in labels}


@pytest.mark.parametrize("config", ["no_uwf", "all"])
@pytest.mark.parametrize("table", ["csv", "xlsx", "xlsx_sheets"])
def test_mshf(tmp_path, config, table):
  m = tmp_path / "manual"
  expected = _mshf_tree(m, table)
  if config == "no_uwf":
    expected = {k: v for k, v in expected.items() if v[1] != 2}
  builder, name = build(mshf.Builder, m, tmp_path / "tfds", config)
  assert builder.info.features["camera"].names == ["tabletop", "portable", "uwf"]
  exs = read(name, tmp_path / "tfds", "train")
  assert len(exs) == len(expected)
  folder = {0: "CFP", 1: "Portable camera", 2: "UWF"}
  got = {f"{folder[e['camera']]}/{e['image/filename'].decode()}": e for e in exs}
  assert sorted(got) == sorted(expected)
  for key, (quality, camera, px) in expected.items():
    assert (got[key]["quality"], got[key]["camera"]) == (quality, camera), key
    np.testing.assert_array_equal(got[key]["image"], px)


def test_mshf_column_and_value_errors(tmp_path):
  m = tmp_path / "manual"
  write_image(m / "CFP" / "1.jpg", 1, "JPEG")
  write_csv(m / "labels.csv", ["Image", "Score"], [["1.jpg", 1]])
  with pytest.raises(_common.DataLayoutError, match="Score"):
    build(mshf.Builder, m, tmp_path / "tfds")
  write_csv(m / "labels.csv", ["Image", "Overall quality"], [["1.jpg", "maybe"]])
  with pytest.raises(_common.DataLayoutError, match="maybe"):
    build(mshf.Builder, m, tmp_path / "tfds2")


def test_mshf_image_labelled_twice_is_an_error(tmp_path):
  m = tmp_path / "manual"
  write_image(m / "CFP" / "1.jpg", 1, "JPEG")
  header = ["Image", "Overall quality"]
  write_csv(m / "CFP" / "a.csv", header, [["1.jpg", 1]])
  write_csv(m / "CFP" / "b.csv", header, [["1.jpg", 0]])
  with pytest.raises(_common.DataLayoutError, match="labelled 2 times"):
    build(mshf.Builder, m, tmp_path / "tfds")


def test_mshf_camera_mapping():
  assert [mshf.camera_of(s) for s in
          ["CFP", "cfp_images", "Portable camera", "UWF", "Ultra-widefield",
           "tabletop", "scans"]] == [
              "tabletop", "tabletop", "portable", "uwf", "uwf", "tabletop", None]
  assert [mshf.quality_of(s) for s in ["1", "0", "1.0", "Good", "poor", "2"]] == [
      0, 1, 0, 0, 1, None]


# ---------------------------------------------------------------- mBRSET

def test_mbrset(tmp_path):
  m = tmp_path / "manual"
  write_image(m / "images" / "1.1.jpg", 1, "JPEG")
  write_image(m / "images" / "1.2.jpg", 2, "JPEG")
  px = write_image(m / "images" / "242.3.jpg", 3, "JPEG")
  header = ["patient", "age", "sex", "dm_time", "insulin", "file",
            "laterality", "final_artifacts", "final_quality", "final_icdr",
            "final_edema"]
  write_csv(m / "labels_mbrset.csv", header, [
      [1, 60, 1, 10, 0, "1.1.jpg", "right", "no", "yes", 0, "no"],
      [1, 60, 1, 10, 0, "1.2.jpg", "left", "yes", "no", "", "no"],
      [242, 55, 0, 3, 1, "242.3", "right", "no", "yes", 4.0, "yes"],  # no ext
  ])
  _, name = build(mbrset.Builder, m, tmp_path / "tfds")
  got = by_file(read(name, tmp_path / "tfds", "train"))
  assert {k: (v["quality"], v["dr_grade"], v["patient"], v["laterality"])
          for k, v in got.items()} == {
              "1.1.jpg": (0, 0, b"1", b"right"),
              "1.2.jpg": (1, -1, b"1", b"left"),
              "242.3.jpg": (0, 4, b"242", b"right")}
  np.testing.assert_array_equal(got["242.3.jpg"]["image"], px)


# ---------------------------------------------------------------- Messidor-2

@pytest.mark.parametrize("config", ["all", "excluded"])
def test_messidor2(tmp_path, config):
  m = tmp_path / "manual"
  write_image(m / "IMAGES" / "20051019_38557_0100_PP.png", 1, "PNG")
  write_image(m / "IMAGES" / "IM000001.JPG", 2, "JPEG")
  write_image(m / "IMAGES" / "IM000002.JPG", 3, "JPEG")
  px = write_image(m / "IMAGES" / "IM000003.JPG", 4, "JPEG")
  (m / "Messidor_NSFS.txt").write_text(
      "IM000001.JPG\n20051019_38557_0100_PP\n\nIM000001.JPG\n")  # dup like the ref
  _, name = build(messidor2.Builder, m, tmp_path / "tfds", config)
  got = by_file(read(name, tmp_path / "tfds", "train"))
  expected = {"IM000002.JPG", "IM000003.JPG"}
  if config == "all":
    expected |= {"20051019_38557_0100_PP.png", "IM000001.JPG"}
  assert set(got) == expected
  assert got["IM000003.JPG"]["id"] == b"IM000003"
  np.testing.assert_array_equal(got["IM000003.JPG"]["image"], px)


def test_messidor2_unknown_exclusion_is_an_error(tmp_path):
  m = tmp_path / "manual"
  write_image(m / "IMAGES" / "IM000001.JPG", 2, "JPEG")
  (m / "Messidor_NSFS.txt").write_text("IM999999.JPG\n")
  with pytest.raises(_common.DataLayoutError, match="IM999999"):
    build(messidor2.Builder, m, tmp_path / "tfds", "excluded")


# ---------------------------------------------------------------- FunPiQ

def write_palette_png(path, idx):
  path.parent.mkdir(parents=True, exist_ok=True)
  im = Image.fromarray(idx.astype(np.uint8), mode="P")
  pal = [c for k in range(4) for c in funpiq.PALETTE[k]]
  im.putpalette(pal + [0] * (768 - len(pal)))
  im.save(path)


def test_funpiq_palette_indices_survive(tmp_path):
  m = tmp_path / "manual"
  rng = np.random.default_rng(0)
  masks = {s: rng.integers(0, 4, size=(10, 12)).astype(np.uint8)
           for s in ("1_left", "img00001", "12.1")}
  for s, idx in masks.items():
    write_palette_png(m / "annotations" / f"{s}.png", idx)
  # Sanity of the fixture: the palette maps index 2 to the usable colour.
  with Image.open(m / "annotations" / "1_left.png") as im:
    assert im.mode == "P"
    assert tuple(np.asarray(im.convert("RGB"))[masks["1_left"] == 2][0]) == funpiq.PALETTE[2]
  write_image(m / "images" / "eyeq" / "1_left.png", 1, "PNG")
  write_image(m / "images" / "brset" / "img00001.jpg", 2, "JPEG")
  write_image(m / "images" / "mbrset" / "12.1.jpg", 3, "JPEG", size=(24, 20))
  _, name = build(funpiq.Builder, m, tmp_path / "tfds")
  exs = read(name, tmp_path / "tfds", "test")
  assert len(exs) == 3
  for e in exs:
    stem = pathlib.Path(e["image/filename"].decode()).stem
    assert e["mask"].shape == (10, 12, 1) and e["mask"].dtype == np.uint8
    np.testing.assert_array_equal(e["mask"][..., 0], masks[stem])
    assert e["source"].decode() == {"1_left": "eyeq", "img00001": "brset",
                                    "12.1": "mbrset"}[stem]
  # The stored mask is a greyscale PNG of indices, whatever decoder reads it.
  raw = tfds.data_source(name, split="test", data_dir=str(tmp_path / "tfds"),
                         download=False, decoders={"mask": tfds.decode.SkipDecoding()})
  with Image.open(io.BytesIO(raw[0]["mask"])) as im:
    assert im.mode == "L"


def test_funpiq_rgb_mask_and_bad_colour(tmp_path):
  idx = np.array([[0, 1], [2, 3]], np.uint8)
  rgb = np.array([[funpiq.PALETTE[int(k)] for k in row] for row in idx], np.uint8)
  p = tmp_path / "a.png"
  Image.fromarray(rgb).save(p)
  np.testing.assert_array_equal(funpiq.read_mask(p), idx)
  rgb[0, 0] = (1, 2, 3)
  Image.fromarray(rgb).save(p)
  with pytest.raises(_common.DataLayoutError, match="not FunPiQ classes"):
    funpiq.read_mask(p)
  Image.fromarray(np.array([[0, 4]], np.uint8), mode="L").save(p)
  with pytest.raises(_common.DataLayoutError, match="class index 4"):
    funpiq.read_mask(p)


def test_funpiq_missing_image_is_an_error(tmp_path):
  m = tmp_path / "manual"
  write_palette_png(m / "annotations" / "1_left.png", np.zeros((4, 4)))
  write_image(m / "images" / "other.png", 1, "PNG")
  with pytest.raises(_common.DataLayoutError, match="1_left"):
    build(funpiq.Builder, m, tmp_path / "tfds")


# ---------------------------------------------------------------- DRIVE

def _drive_split(d, ids, kind, seed):
  out = {}
  rng = np.random.default_rng(seed)
  for i in ids:
    stem = f"{i}_{kind}"
    px = write_image(d / "images" / f"{stem}.tif", seed + int(i), "TIFF")
    ves = rng.integers(0, 2, size=(10, 12)).astype(np.uint8)
    fov = rng.integers(0, 2, size=(10, 12)).astype(np.uint8)
    for sub, name, arr in (("1st_manual", f"{i}_manual1.gif", ves),
                           ("mask", f"{stem}_mask.gif", fov)):
      (d / sub).mkdir(parents=True, exist_ok=True)
      Image.fromarray(arr * 255).save(d / sub / name)
    if kind == "test":
      (d / "2nd_manual").mkdir(exist_ok=True)
      Image.fromarray(ves * 255).save(d / "2nd_manual" / f"{i}_manual2.gif")
    out[i] = (px, ves, fov)
  return out


def test_drive(tmp_path):
  m = tmp_path / "manual"
  truth = {"train": _drive_split(m / "DRIVE" / "training", ["21", "22"], "training", 10),
           "test": _drive_split(m / "DRIVE" / "test", ["01", "02"], "test", 20)}
  _, name = build(drive.Builder, m, tmp_path / "tfds")
  for split, items in truth.items():
    exs = read(name, tmp_path / "tfds", split)
    assert sorted(e["id"].decode() for e in exs) == sorted(items)
    for e in exs:
      px, ves, fov = items[e["id"].decode()]
      np.testing.assert_array_equal(e["image"], px)  # TIFF -> lossless PNG
      np.testing.assert_array_equal(e["vessels"][..., 0], ves)
      np.testing.assert_array_equal(e["fov_mask"][..., 0], fov)


# ---------------------------------------------------------------- synthetic

@pytest.mark.parametrize("deg_format", ["npy", "png"])
def test_efiqa_synth(tmp_path, deg_format):
  m = tmp_path / "manual"
  rng = np.random.default_rng(0)
  rows, truth = [], {}
  for n, (grade, csv_grade) in enumerate([(0, "good"), (2, "2"), (1, "usable")]):
    sid = f"synth_{n:05d}"
    px = write_image(m / "images" / f"{sid}.png", n, "PNG", size=(16, 16))
    ves = rng.integers(0, 2, size=(16, 16)).astype(np.uint8)
    (m / "vessels").mkdir(exist_ok=True)
    (m / "degradation").mkdir(exist_ok=True)
    Image.fromarray(ves * 255).save(m / "vessels" / f"{sid}.png")
    if deg_format == "npy":
      deg = rng.random((16, 16)).astype(np.float32)
      np.save(m / "degradation" / f"{sid}.npy", deg)
    else:
      q = rng.integers(0, 256, size=(16, 16)).astype(np.uint8)
      Image.fromarray(q).save(m / "degradation" / f"{sid}.png")
      deg = q.astype(np.float32) / 255.0
    rows.append([sid, 100 + n, "blur;haze" if n else "", 0.25 * n, 0.1 * n, csv_grade])
    truth[sid] = (px, ves, deg, grade, 100 + n)
  write_csv(m / "labels.csv", list(synth.COLUMNS), rows)
  _, name = build(synth.Builder, m, tmp_path / "tfds")
  exs = read(name, tmp_path / "tfds", "train")
  assert len(exs) == 3
  for e in exs:
    px, ves, deg, grade, seed = truth[e["id"].decode()]
    np.testing.assert_array_equal(e["image"], px)
    np.testing.assert_array_equal(e["vessels"][..., 0], ves)
    assert e["degradation"].dtype == np.float32
    np.testing.assert_array_equal(e["degradation"], deg)
    assert (e["grade"], e["seed"]) == (grade, seed)
  by_id = {e["id"].decode(): e for e in exs}
  assert by_id["synth_00001"]["degradations"] == b"blur;haze"
  # The training pipeline's access path: grain over the TFDS data source.
  import grain
  ds = tfds.data_source(name, split="train", data_dir=str(tmp_path / "tfds"),
                        download=False)
  first = grain.MapDataset.source(ds).map(lambda e: e["vessels"].sum())[0]
  assert first == int(ds[0]["vessels"].sum()) > 0
  assert by_id["synth_00002"]["severity"] == pytest.approx(0.5)
  assert by_id["synth_00002"]["degraded_fraction"] == pytest.approx(0.2)


# ---------------------------------------------------------------- manual dir

@pytest.mark.parametrize("module", [eyeq, drimdb, mshf, mbrset, messidor2,
                                    funpiq, drive, synth],
                         ids=lambda mod: mod.__name__.split(".")[1])
def test_missing_manual_dir_gives_instructions(tmp_path, module):
  with pytest.raises(AssertionError) as err:
    build(module.Builder, tmp_path / "nowhere", tmp_path / "tfds")
  msg = str(err.value)
  assert "does not exist or is empty" in msg
  assert module.Builder.MANUAL_DOWNLOAD_INSTRUCTIONS.strip()[:40] in msg


# ---------------------------------------------------------------- storage

def test_rgb_bytes_keeps_jpeg_png_and_converts_the_rest(tmp_path):
  jpg = tmp_path / "a.jpg"
  write_image(jpg, 1, "JPEG")
  assert _common.rgb_bytes(jpg) == jpg.read_bytes()
  for name, fmt, mode in (("g.jpg", "JPEG", "L"), ("r.png", "PNG", "RGBA"),
                          ("t.tif", "TIFF", "RGB")):
    p = tmp_path / name
    px = write_image(p, 2, fmt, mode=mode)
    data = _common.rgb_bytes(p)
    with Image.open(io.BytesIO(data)) as im:
      assert (im.format, im.mode) == ("PNG", "RGB")
      np.testing.assert_array_equal(np.asarray(im), px)


_CLI_STYLE_BUILD = r"""
import sys
sys.path.insert(0, sys.argv[1])          # data/, as `tfds build data/<name>` does
import tensorflow_datasets as tfds
from funpiq import funpiq_dataset_builder as mod   # no `data` package here
assert mod.common.__file__.endswith("_common.py"), mod.common.__file__
b = mod.Builder(data_dir=sys.argv[3])
b.download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=sys.argv[2]),
    file_format="array_record")
"""

_READ_WITHOUT_TF = r"""
import sys
sys.path.insert(0, sys.argv[2])   # site-packages minus TensorFlow (python -S)
import numpy as np
import tensorflow_datasets as tfds
try:
  import tensorflow
  raise SystemExit("TensorFlow still importable")
except ImportError:
  pass
ds = tfds.data_source("funpiq", split="test", data_dir=sys.argv[1], download=False)
ex = ds[0]
assert "tensorflow" not in sys.modules
print(len(ds), ex["image"].shape, ex["mask"][..., 0].tolist())
"""


def test_cli_layout_build_and_read_without_tensorflow(tmp_path):
  """`tfds build data/funpiq` imports the builder as funpiq.funpiq_dataset_builder;
  reading back needs neither the builder code nor TensorFlow."""
  import subprocess
  m = tmp_path / "manual"
  idx = np.array([[0, 1, 2], [3, 2, 1]], np.uint8)
  write_palette_png(m / "annotations" / "1_left.png", idx)
  write_image(m / "images" / "1_left.png", 1, "PNG", size=(3, 2))
  import os
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  out_dir = tmp_path / "tfds"
  subprocess.run([sys.executable, "-c", _CLI_STYLE_BUILD, str(REPO / "data"),
                  str(m), str(out_dir)], check=True, env=env, cwd=tmp_path,
                 capture_output=True)
  # A view of site-packages without TensorFlow, as on a TF-less machine.
  import sysconfig
  site = pathlib.Path(sysconfig.get_paths()["purelib"])
  view = tmp_path / "site_without_tf"
  view.mkdir()
  for entry in site.iterdir():
    if entry.name == "tensorflow" or entry.name.startswith(
        ("tensorflow-", "tensorflow_cpu")):
      continue
    os.symlink(entry, view / entry.name)
  res = subprocess.run([sys.executable, "-S", "-c", _READ_WITHOUT_TF, str(out_dir),
                        str(view)],
                       env=env, cwd=tmp_path, capture_output=True, text=True)
  assert res.returncode == 0, res.stderr[-3000:]
  assert res.stdout.strip().splitlines()[-1] == f"1 (2, 3, 3) {idx.tolist()}"


def test_eyeq_on_real_eyepacs_photographs(tmp_path, fundus_dir):
  """Real EyePACS JPEGs (symlinked, never copied) go through byte-for-byte."""
  import os
  m = tmp_path / "manual"
  (m / "test").mkdir(parents=True)
  (m / "train").mkdir()
  names = ["116_right.jpg", "6834_left.jpg"]
  for n in names:
    os.symlink(fundus_dir / "eyepacs" / n, m / "test" / n)
  header = ["", "image", "quality", "DR_grade"]
  # 6834_left is graded Reject in EyeQ's test labels (shared/data README).
  write_csv(m / "Label_EyeQ_test.csv", header,
            [[0, "116_right.jpeg", 1, 0], [1, "6834_left.jpeg", 2, 0]])
  os.symlink(fundus_dir / "eyepacs" / "373_left.jpg", m / "train" / "373_left.jpg")
  write_csv(m / "Label_EyeQ_train.csv", header, [[0, "373_left.jpeg", 0, 0]])
  _, name = build(eyeq.Builder, m, tmp_path / "tfds")
  got = by_file(read(name, tmp_path / "tfds", "test"))
  raw = by_file(read(name, tmp_path / "tfds", "test", raw_image=True))
  assert got["6834_left.jpg"]["quality"] == 2
  for n in names:
    assert raw[n]["image"] == (fundus_dir / "eyepacs" / n).read_bytes()
    with Image.open(fundus_dir / "eyepacs" / n) as im:
      np.testing.assert_array_equal(got[n]["image"], np.asarray(im.convert("RGB")))


def test_build_script(tmp_path, capsys):
  from data import build as build_script
  m = tmp_path / "manual"
  write_image(m / "Good" / "g.jpg", 1, "JPEG")
  write_image(m / "Bad" / "b.jpg", 2, "JPEG")
  write_image(m / "Outlier" / "o.jpg", 3, "JPEG")
  assert build_script.main(["drimdb", "--config=all", f"--manual_dir={m}",
                            f"--data_dir={tmp_path / 'tfds'}"]) == 0
  assert "drimdb/all/1.0.0 train: 3 examples" in capsys.readouterr().out
  labels = sorted(e["label"] for e in read("drimdb/all", tmp_path / "tfds", "train"))
  assert labels == [0, 1, 2]
  with pytest.raises(SystemExit):
    build_script.main(["nosuch", f"--manual_dir={m}"])


def test_mbrset_bad_quality_value_is_an_error(tmp_path):
  m = tmp_path / "manual"
  write_image(m / "images" / "1.1.jpg", 1, "JPEG")
  write_csv(m / "labels_mbrset.csv", ["patient", "file", "final_quality"],
            [[1, "1.1.jpg", ""]])
  with pytest.raises(_common.DataLayoutError, match="final_quality not yes/no"):
    build(mbrset.Builder, m, tmp_path / "tfds")


def test_funpiq_aspect_mismatch_is_an_error(tmp_path):
  m = tmp_path / "manual"
  write_palette_png(m / "annotations" / "1_left.png", np.zeros((10, 10)))
  write_image(m / "images" / "eyeq" / "1_left.jpeg", 1, "JPEG", size=(15, 10))
  with pytest.raises(_common.DataLayoutError, match="different aspect"):
    build(funpiq.Builder, m, tmp_path / "tfds")
