"""Input listing, ids, grain sources and the never-raising record transform."""
import io
import os
import pickle

import numpy as np
import pytest

from efiqa_jax import sources
from tests import pipeline_fakes as fakes


def _touch(path, data=b"x"):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)
  return path


# ------------------------------------------------------------------ list_inputs


@pytest.fixture
def tree(tmp_path):
  r = str(tmp_path)
  for rel in ["b/2.PNG", "b/1.jpg", "a/z.TIF", "a/sub/y.jpeg", "a/notes.txt",
              "a/.hidden.png", "c.dcm", "d.bmp", "e.gif", "x.tiff",
              "table.csv.bak"]:
    _touch(os.path.join(r, rel))
  return r


def test_folder_recursive_images_only_sorted(tree):
  got = sources.list_inputs([tree])
  rel = [os.path.relpath(p, tree) for p in got]
  assert rel == ["a/sub/y.jpeg", "a/z.TIF", "b/1.jpg", "b/2.PNG", "c.dcm",
                 "d.bmp", "e.gif", "x.tiff"]


def test_order_of_inputs_kept_and_missing_path_kept(tree):
  missing = os.path.join(tree, "gone.png")
  got = sources.list_inputs([os.path.join(tree, "d.bmp"), missing,
                             os.path.join(tree, "b")])
  assert got == [os.path.join(tree, "d.bmp"), missing,
                 os.path.join(tree, "b", "1.jpg"),
                 os.path.join(tree, "b", "2.PNG")]
  # A single string works as one input.
  assert sources.list_inputs(missing) == [missing]


def test_glob(tree):
  got = sources.list_inputs([os.path.join(tree, "*")])
  rel = [os.path.relpath(p, tree) for p in got]
  # Folders matched by the glob are expanded; non-image files skipped.
  assert rel == ["a/sub/y.jpeg", "a/z.TIF", "b/1.jpg", "b/2.PNG", "c.dcm",
                 "d.bmp", "e.gif", "x.tiff"]
  with pytest.raises(ValueError, match="no image"):
    sources.list_inputs([os.path.join(tree, "*.nothing")])


def test_csv_relative_and_absolute(tree, tmp_path):
  sub = tmp_path / "lists"
  sub.mkdir()
  csv_path = sub / "in.csv"
  abs_file = os.path.join(tree, "c.dcm")
  csv_path.write_text(f"id,path\n1,../b/1.jpg\n2,{abs_file}\n3,nothere.png\n")
  got = sources.list_inputs([str(csv_path)])
  assert got == [os.path.join(str(sub), "../b/1.jpg"), abs_file,
                 os.path.join(str(sub), "nothere.png")]
  assert os.path.isfile(got[0])


def test_csv_without_path_column_and_empty_folder_raise(tmp_path):
  bad = tmp_path / "bad.csv"
  bad.write_text("file\nx.png\n")
  with pytest.raises(ValueError, match="path"):
    sources.list_inputs([str(bad)])
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="no image"):
    sources.list_inputs([str(tmp_path / "empty")])


def test_unique_ids():
  paths = ["x/a.png", "y/a.jpg", "z/A.png", "a__2.png", "q/b.tif", "r/a.png"]
  ids = sources.unique_ids(paths)
  assert ids == ["a", "a__2", "A__3", "a__2__2", "b", "a__4"]
  assert len({i.lower() for i in ids}) == len(ids)
  assert sources.unique_ids(paths) == ids  # deterministic


# ---------------------------------------------------------------- data sources


def test_path_source():
  src = sources.PathSource(["a.png", "b.png"])
  assert len(src) == 2 and src[1] == {"path": "b.png"}


def test_synthetic_source_with_stand_in():
  src = sources.SyntheticSource(5, seed=3, size=16,
                                generate_fn=fakes.fake_generate)
  assert len(src) == 5
  r0, r0b, r1 = src[0], src[0], src[1]
  np.testing.assert_array_equal(r0["sample"].image, r0b["sample"].image)
  assert not np.array_equal(r0["sample"].image, r1["sample"].image)
  assert r0["sample"].labels["seed"] == sources.synthetic_seed(3, 0)
  other = sources.SyntheticSource(5, seed=4, size=16,
                                  generate_fn=fakes.fake_generate)
  assert not np.array_equal(other[0]["sample"].image, r0["sample"].image)
  with pytest.raises(IndexError):
    src[5]
  row = sources.ReadRecord(src, sources.PrepareSynthetic(16)).map(2)
  assert row["ok"] and row["valid"] and row["index"] == 2
  assert row["vessels"].shape == (16, 16) and row["degradation"].dtype == (
      np.float32)
  pad = sources.ReadRecord(src, sources.PrepareSynthetic(16)).map(7)
  assert set(pad) == set(row) and not pad["valid"]


def test_synthetic_source_real_generator():
  src = sources.SyntheticSource(2, seed=0, size=64)
  row = sources.ReadRecord(src, sources.PrepareSynthetic(64)).map(1)
  assert row["status"] == "ok", row["message"]
  assert row["image"].shape == (64, 64, 3)


def test_tfds_source_array_record(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  from PIL import Image

  def png(i):
    buf = io.BytesIO()
    Image.fromarray(np.full((6, 6, 3), i * 10, np.uint8)).save(buf, "PNG")
    return buf.getvalue()

  class TinyFundusPipelineTest(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          features=tfds.features.FeaturesDict({
              "image": tfds.features.Image(shape=(None, None, 3)),
              "name": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(5)}

    def _generate_examples(self, n):
      for i in range(n):
        yield i, {"image": png(i), "name": f"img{i}.png"}

  data_dir = str(tmp_path / "tfds")
  TinyFundusPipelineTest(
      data_dir=data_dir, file_format="array_record").download_and_prepare()
  src = sources.TFDSSource("tiny_fundus_pipeline_test", "train",
                           data_dir=data_dir, id_key="name")
  assert len(src) == 5
  names = sorted(src[i]["path"] for i in range(5))
  assert names == [f"img{i}.png" for i in range(5)]
  rec = src[0]
  assert isinstance(rec["image"], bytes)
  img = np.asarray(Image.open(io.BytesIO(rec["image"])))
  want = int(rec["path"][3]) * 10
  assert img.shape == (6, 6, 3) and (img == want).all()

  # Bytes go through PrepareFundus' source_key into the load function.
  seen = []

  def load(source, size):
    seen.append(type(source))
    return fakes.fake_prepare("img3.png", size)
  prep = sources.PrepareFundus(8, load_fn=load, source_key="image")
  row = sources.ReadRecord(src, prep).map(0)
  assert row["ok"] and seen == [bytes] and row["path"] == rec["path"]
  # Grain workers need picklable sources; the copy reopens from the folder.
  src2 = pickle.loads(pickle.dumps(src))
  assert len(src2) == 5 and src2[2] == src[2]


# --------------------------------------------------------- per-record transform


def test_read_record_never_raises_and_keeps_slot():
  paths = ["/d/img0.png", "/d/img1_bad.png", "/d/img2_raise.png",
           "/d/img3.png"]
  rr = sources.ReadRecord(sources.PathSource(paths),
                          sources.PrepareFundus(8, load_fn=fakes.fake_prepare))
  rows = [rr.map(i) for i in range(6)]
  assert [r["status"] for r in rows] == ["ok", "unreadable", "error", "ok",
                                         "padding", "padding"]
  assert [bool(r["valid"]) for r in rows] == [True] * 4 + [False] * 2
  assert [bool(r["ok"]) for r in rows] == [True, False, False, True, False,
                                           False]
  assert [int(r["index"]) for r in rows] == [0, 1, 2, 3, -1, -1]
  assert "stand-in failure" in rows[2]["message"]
  assert rows[2]["path"] == paths[2]
  assert rows[1]["message"] == "cannot decode"
  for r in rows:
    assert r["image"].shape == (8, 8, 3) and r["image"].dtype == np.uint8
    assert r["fov_mask"].shape == (8, 8) and r["fov_mask"].dtype == bool
    assert set(r) == set(rows[0])
  assert (rows[3]["image"] == 3).all() and not rows[1]["image"].any()
  np.testing.assert_array_equal(rows[3]["crop"], [3, 0, 8, 9, 10])
  np.testing.assert_allclose(rows[3]["fov"], [4, 4, 3])
  # Picklable (grain worker processes receive it).
  rr2 = pickle.loads(pickle.dumps(rr))
  assert rr2.map(3)["status"] == "ok"


def test_ok_with_wrong_shape_becomes_error_row():
  def load(source, size):
    return fakes.fake_prepare(source, size + 1)
  rr = sources.ReadRecord(sources.PathSource(["img1.png"]),
                          sources.PrepareFundus(8, load_fn=load))
  row = rr.map(0)
  assert row["status"] == "error" and "shape" in row["message"]
  assert row["valid"] and not row["ok"]


def test_prepare_fundus_real(fundus_dir, tmp_path):
  imgs = sources.list_inputs([str(fundus_dir)])[:1]
  paths = imgs + [str(tmp_path / "missing.png")]
  rr = sources.ReadRecord(sources.PathSource(paths),
                          sources.PrepareFundus(64))
  ok, missing = rr.map(0), rr.map(1)
  assert ok["status"] == "ok", ok["message"]
  assert ok["image"].shape == (64, 64, 3) and ok["fov_mask"].any()
  assert missing["status"] == "not_found" and missing["valid"]
