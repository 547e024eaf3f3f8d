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
from data.eyeq import eyeq_dataset_builder as eyeq  # noqa: E402


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
