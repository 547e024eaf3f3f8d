"""`efiqa benchmark` and `efiqa distill` from prepared folders (`efiqa
prepare`) and tfds: datasets (issue 14 §2): the same results as from the
photographs; `--split` splits a prepared folder as its photographs' folder;
another prepared size, and prepared crops for whole-photograph features,
are refused in one line."""
import glob
import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from efiqa_jax import cli
from tests.assess_fixtures import distill_models, tiny_teacher

SIZE = 128  # the tiny teacher's work size
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _one_line(err, *words):
  lines = [l for l in err.strip().splitlines() if l.strip()]
  assert len(lines) == 1 and "Traceback" not in err, err
  for w in words:
    assert w in lines[0], lines[0]


def _close(a, b, path="", tol=1e-9):
  """Equal JSON values; floats within tol (a TFDS build may hold the
  records in another order, which changes summation order only)."""
  if isinstance(a, dict):
    assert isinstance(b, dict) and sorted(a) == sorted(b), (path, a, b)
    for k in a:
      _close(a[k], b[k], f"{path}.{k}", tol)
  elif isinstance(a, list):
    assert isinstance(b, list) and len(a) == len(b), (path, a, b)
    for i, (x, y) in enumerate(zip(a, b)):
      _close(x, y, f"{path}[{i}]", tol)
  elif isinstance(a, float):
    assert (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol, (path, a,
                                                                    b)
  else:
    assert a == b, (path, a, b)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  """Synthetic photographs (160 px) in two sets (SET/images/, as in
  fundus_train: the sets are the strata of `--split`), one broken file."""
  from efiqa_jax import synth
  d = tmp_path_factory.mktemp("photos")
  for i in range(6):
    sub = d / ("set_a" if i < 3 else "set_b") / "images"
    sub.mkdir(parents=True, exist_ok=True)
    Image.fromarray(synth.generate(i, 160).image).save(sub / f"eye{i}.png")
  (d / "set_b" / "images" / "zz_broken.png").write_bytes(b"not an image")
  return str(d)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  return tiny_teacher(tmp_path_factory.mktemp("t") / "teacher",
                      work_size=SIZE)


@pytest.fixture(scope="module")
def prep(photos, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("prepared") / "p")
  assert cli.main(["prepare", photos, "--out", out, "--size", str(SIZE),
                   "--records-per-shard", "3", "--quiet"]) == 3
  return out


def _bench(inputs, teacher, js, *extra):
  return cli.main(["benchmark", *inputs, "--model", teacher, "--kinds",
                   "blur,haze", "--severities", "0.65", "--json", str(js),
                   *extra, "--quiet"])


def test_benchmark_from_a_prepared_folder_equals_the_photographs(
    photos, prep, teacher, tmp_path, capsys):
  assert _bench([photos], teacher, tmp_path / "a.json") == 0
  assert _bench([prep], teacher, tmp_path / "b.json") == 0
  a = json.load(open(tmp_path / "a.json"))
  b = json.load(open(tmp_path / "b.json"))
  assert a["n_photos"] == 6 and a["n_variants"] == 12
  assert [f["status"] for f in a["failed"]] == ["unreadable"]
  assert a == b  # the failure row included, named by its photograph
  # Another work size than the prepared one: one line, exit 2.
  capsys.readouterr()
  assert cli.main(["benchmark", prep, "--model",
                   tiny_teacher(tmp_path / "t96", work_size=96),
                   "--quiet"]) == 2
  _one_line(capsys.readouterr().err, "efiqa benchmark", f"prepared at {SIZE} "
            "px")


def test_benchmark_split_of_a_prepared_folder_is_the_folders(
    photos, prep, teacher, tmp_path):
  """Every split of the prepared folder holds the same photographs as that
  split of the folder (strata: the sets), and the heldout results equal."""
  from efiqa_jax import benchmark
  seen = []
  for split in ("heldout", "calibration", "train"):
    a = [e[0] for e in benchmark._entries([photos], split)[0]]
    b = [e[0] for e in benchmark._entries([prep], split)[0]]
    assert a == b, split
    seen += a
  assert sorted(seen) == sorted(glob.glob(os.path.join(photos, "*", "*",
                                                      "*")))
  assert _bench([photos], teacher, tmp_path / "a.json", "--split",
                "heldout") == 0
  assert _bench([prep], teacher, tmp_path / "b.json", "--split",
                "heldout") == 0
  a = json.load(open(tmp_path / "a.json"))
  assert 1 <= a["n_photos"] + len(a["failed"]) < 7
  assert a == json.load(open(tmp_path / "b.json"))




def test_benchmark_from_a_tfds_dataset_equals_the_photographs(
    synth_tfds, teacher, tmp_path, monkeypatch):
  images, data_dir = synth_tfds
  monkeypatch.setenv("TFDS_DATA_DIR", data_dir)
  assert _bench([images], teacher, tmp_path / "a.json") == 0
  assert _bench(["tfds:efiqa_synth:train"], teacher, tmp_path / "b.json") == 0
  a = json.load(open(tmp_path / "a.json"))
  assert a["n_photos"] == 4
  _close(a, json.load(open(tmp_path / "b.json")))


def test_benchmark_heldout_of_prepared_fundus_train(fundus_train_dir,
                                                    teacher, tmp_path):
  """../shared/data/fundus_train prepared through its manifest (the 90
  photographs, not their annotation images): `--split heldout` takes the
  same 18 photographs as from the folder, with the same results."""
  from efiqa_jax import benchmark
  d = str(fundus_train_dir)
  prep = str(tmp_path / "prep")
  assert cli.main(["prepare", os.path.join(d, "manifest.csv"), "--out", prep,
                   "--size", str(SIZE), "--quiet"]) == 0
  for split in ("heldout", "calibration", "train"):
    a = [os.path.abspath(e[0]) for e in benchmark._entries([d], split)[0]]
    b = [os.path.abspath(e[0]) for e in benchmark._entries([prep], split)[0]]
    assert a == b and a, split
  assert len(a) == 90 - 18 - len(
      benchmark._entries([d], "calibration")[0])
  assert cli.main(["benchmark", d, "--model", teacher, "--kinds", "blur",
                   "--severities", "0.65", "--split", "heldout", "--json",
                   str(tmp_path / "a.json"), "--quiet"]) == 0
  assert cli.main(["benchmark", prep, "--model", teacher, "--kinds", "blur",
                   "--severities", "0.65", "--split", "heldout", "--json",
                   str(tmp_path / "b.json"), "--quiet"]) == 0
  a = json.load(open(tmp_path / "a.json"))
  assert a["n_photos"] == 18 and not a["failed"]
  assert a == json.load(open(tmp_path / "b.json"))


# ---------------------------------------------------------------- distill


def _distill(tmp_path, inputs, wd, *extra):
  return cli.main(["distill", *inputs, "--teacher", str(tmp_path / "teacher"),
                   "--encoder", str(tmp_path / "enc"), "--workdir", str(wd),
                   "--config", os.path.join(REPO, "configs/adapter.py:tiny"),
                   "--set", "config.size=64", "--set", "config.work_size=96",
                   "--set", "config.batch_size=32", "--set",
                   "config.epochs=1", *extra, "--quiet"])


def _same_distill(a, b):
  """Equal pseudo-labels (anomaly maps within 1e-6, labels), features and
  trained adapter parameters (within 1e-6)."""
  from flax import nnx
  from efiqa_jax import checkpoints
  pats = ["pseudo/anomaly/*.npy", "pseudo/labels/*.png", "features/*.npy"]
  if os.path.isdir(os.path.join(a, "pseudo_efiqa")):
    pats.append("pseudo_efiqa/labels/*.png")
  for pat in pats:
    names = sorted(os.path.relpath(f, a) for f in glob.glob(os.path.join(
        a, pat)))
    assert names and names == sorted(os.path.relpath(f, b) for f in
                                     glob.glob(os.path.join(b, pat))), pat
    for n in names:
      load = (np.load if n.endswith(".npy")
              else lambda f: np.asarray(Image.open(f)))
      np.testing.assert_allclose(load(os.path.join(b, n)),
                                 load(os.path.join(a, n)), atol=1e-6, rtol=0,
                                 err_msg=n)
  pa = nnx.state(checkpoints.load_model(os.path.join(a, "train", "adapter"))[0])
  pb = nnx.state(checkpoints.load_model(os.path.join(b, "train", "adapter"))[0])
  la, lb = (nnx.to_flat_state(p) for p in (pa, pb))
  assert la and [k for k, _ in la] == [k for k, _ in lb]
  for (k, x), (_, y) in zip(la, lb):
    np.testing.assert_allclose(np.asarray(y[...]), np.asarray(x[...]),
                               atol=1e-6, rtol=0, err_msg=str(k))


def test_distill_from_a_prepared_folder_and_tfds_equals_the_photographs(
    synth_tfds, tmp_path, monkeypatch, capsys):
  images, data_dir = synth_tfds
  monkeypatch.setenv("TFDS_DATA_DIR", data_dir)
  distill_models(tmp_path)
  prep = str(tmp_path / "prep")
  assert cli.main(["prepare", images, "--out", prep, "--size", "96",
                   "--quiet"]) == 0
  a, b, c = (str(tmp_path / k) for k in ("a", "b", "c"))
  assert _distill(tmp_path, [images], a) == 0
  assert _distill(tmp_path, [prep], b) == 0
  assert _distill(tmp_path, ["tfds:efiqa_synth:train"], c) == 0
  assert len(os.listdir(os.path.join(a, "pseudo", "labels"))) == 4
  _same_distill(a, b)
  _same_distill(a, c)
  # Whole-photograph features and photograph-frame labels from tfds:
  # records (their stored bytes, not a file).
  e1, e2 = str(tmp_path / "e1"), str(tmp_path / "e2")
  assert _distill(tmp_path, [images], e1, "--preprocess", "efiqa") == 0
  assert _distill(tmp_path, ["tfds:efiqa_synth:train"], e2, "--preprocess",
                  "efiqa") == 0
  assert len(os.listdir(os.path.join(e1, "pseudo_efiqa", "labels"))) == 4
  _same_distill(e1, e2)
  # Another work size than the prepared one; whole-photograph features
  # from FOV crops: one line each, exit 2, nothing written.
  capsys.readouterr()
  assert _distill(tmp_path, [prep], tmp_path / "d", "--set",
                  "config.work_size=128") == 2
  _one_line(capsys.readouterr().err, "efiqa distill", "prepared at 96 px")
  assert _distill(tmp_path, [prep], tmp_path / "e", "--preprocess",
                  "efiqa") == 2
  _one_line(capsys.readouterr().err, "efiqa distill", "--preprocess efiqa")
  assert not os.path.exists(tmp_path / "d") and not os.path.exists(
      tmp_path / "e")
  # The photographs' workdir is not silently reused for prepared crops.
  assert _distill(tmp_path, [prep], a) == 2
  _one_line(capsys.readouterr().err, "efiqa distill", "prepared_inputs")
