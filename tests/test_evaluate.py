"""`efiqa evaluate` against metrics computed by hand on small fixtures."""
import csv
import json

import numpy as np
import pytest
from PIL import Image

from efiqa_jax import cli
from efiqa_jax import evaluate as ev


def test_binary_metrics_by_hand():
  y = np.array([1, 1, 1, 0, 0, 0, 1, 0], bool)
  p = np.array([1, 1, 0, 0, 1, 0, 1, 0], bool)
  # tp 3, fp 1, tn 3, fn 1
  assert ev.confusion(y, p) == (3, 1, 3, 1)
  assert ev.balanced_accuracy(y, p) == pytest.approx(0.75)
  assert ev.f1(y, p) == pytest.approx(6 / 8)
  assert ev.mcc(y, p) == pytest.approx(8 / 16)
  y2, s2 = np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.7, 0.1])
  # P/R at 0.9: 1/.5, 0.8: .5/.5, 0.7: 2/3 / 1, 0.1: .5/1
  assert ev.average_precision(y2, s2) == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_eyeq_metrics_by_hand():
  y, p = np.array([0, 1, 2, 2]), np.array([0, 2, 2, 1])
  # O = [[1,0,0],[0,0,1],[0,1,1]]; sum wO = .5; sum wE = 1.375
  assert ev.qwk(y, p) == pytest.approx(1 - 0.5 / 1.375)
  m = ev.macro_prf(y, p)
  # per class P = (1, 0, .5), R = (1, 0, .5), F1 = (1, 0, .5)
  assert (m["precision"], m["recall"], m["f1"]) == pytest.approx((.5, .5, .5))
  res = ev.evaluate_eyeq(y, p, n_boot=0)
  assert res["metrics"]["accuracy"] == 0.5


def test_kfold_threshold_protocol_by_hand():
  # Separable: every training split's BAcc-best threshold is its lowest
  # positive score; a held-out positive below it is missed.
  s = np.array([0.9, 0.8, 0.7, 0.6, 0.1, 0.2, 0.3, 0.4])
  y = np.array([1, 1, 1, 1, 0, 0, 0, 0], bool)
  folds = ev.stratified_folds(y, 2, seed=0)
  for f in (0, 1):
    assert np.sum(y[folds == f]) == 2 and np.sum(~y[folds == f]) == 2
  want = np.zeros(8, bool)
  for f in (0, 1):
    t = s[(folds != f) & y].min()
    want[folds == f] = s[folds == f] >= t
  pred, thr = ev.kfold_predictions(y, s, 2, seed=0)
  np.testing.assert_array_equal(pred, want)
  # 0.6 is held out with 2 positives above it in training -> it is missed
  # exactly when 0.6 is not the training minimum, i.e. always here.
  assert not pred[3] and pred[0] and not pred[4:].any()
  assert ev.best_bacc_threshold([1, 0, 1, 0], [0.9, 0.5, 0.6, 0.1]) == 0.6


def _write(path, rows):
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)


def test_cli_binary(tmp_path, capsys):
  ids = [f"i{k}" for k in range(8)]
  q = [0.9, 0.8, 0.7, 0.6, 0.1, 0.2, 0.3, 0.4]
  _write(tmp_path / "scores.csv",
         [{"id": i, "status": "ok", "quality": v} for i, v in zip(ids, q)] +
         [{"id": "bad", "status": "unreadable", "quality": ""}])
  _write(tmp_path / "labels.csv",
         [{"image": f"/x/{i}.png", "label": int(v > 0.5)}
          for i, v in zip(ids, q)] +
         [{"image": "bad.jpg", "label": 1}, {"image": "gone.jpg", "label": 0}])
  assert cli.main(["evaluate", "--scores", str(tmp_path / "scores.csv"),
                   "--labels", str(tmp_path / "labels.csv"), "--out",
                   str(tmp_path / "o"), "--folds", "2", "--bootstrap",
                   "50"]) == 0
  assert "auroc" in capsys.readouterr().out
  res = json.load(open(tmp_path / "o" / "metrics.json"))
  assert res["metrics"]["auroc"] == 1.0 and res["metrics"]["auprc"] == 1.0
  assert res["score_not_ok"] == ["bad"]
  assert res["labels_without_score"] == ["gone"]
  assert res["n"] == 8 and set(res["ci95"]) == set(res["metrics"])
  lo, hi = res["ci95"]["bacc"]
  assert 0 <= lo <= res["metrics"]["bacc"] <= hi <= 1
  assert (tmp_path / "o" / "metrics.md").read_text().startswith(
      "# efiqa evaluate")


def test_pixel_metrics_by_hand(tmp_path):
  ann = np.array([[3, 3, 2, 2],
                  [1, 1, 1, 1],
                  [0, 0, 0, 0],
                  [0, 0, 0, 0]], np.uint8)
  m = np.array([[0.9, 0.8, 0.5, 0.6],
                [0.1, 0.2, 0.3, 0.85],
                [0.99, 0.99, 0.99, 0.99],  # background: ignored
                [0.0, 0.0, 0.0, 0.0]], np.float32)
  h = ev.pixel_histograms(m, ann, (0, 0, 4))
  assert h.sum(1).tolist() == [4, 2, 2]
  r = ev.pixel_metrics(h)
  # bad {.9,.8} vs rest {.5,.6,.1,.2,.3,.85}: .8 loses to .85 only.
  assert r["auroc"] == pytest.approx(11 / 12)
  assert r["auprc"] == pytest.approx(0.5 + 0.5 * 2 / 3)
  assert r["dice"] == pytest.approx(0.8)   # threshold .8: tp 2, fp 1
  assert r["sens_at_95spec"] == pytest.approx(0.5)  # no false positive
  # Best 3-class cut: .85 usable, .9 bad -> O=[[3,1,0],[0,2,0],[0,1,1]].
  assert r["qwk"] == pytest.approx(1 - 0.5 / 2.25)
  # Crop placement: a 2x2 map at (1, 1) of a 4x4 photograph.
  ann2 = np.zeros((4, 4), np.uint8)
  ann2[1, 1], ann2[2, 2], ann2[0, 0] = 3, 1, 1
  h2 = ev.pixel_histograms(np.array([[0.7, 0], [0, 0.2]], np.float32), ann2,
                           (1, 1, 2))
  assert np.flatnonzero(h2[2]).tolist() == [7000]
  assert sorted(np.flatnonzero(h2[0]).tolist()) == [0, 2000]  # 0 outside


def test_cli_pixel(tmp_path):
  (tmp_path / "maps").mkdir()
  (tmp_path / "ann").mkdir()
  rows = []
  rng = np.random.default_rng(0)
  for k in range(3):
    ann = rng.integers(1, 4, size=(8, 8)).astype(np.uint8)
    mp = (ann == 3) * 0.8 + rng.random((8, 8)) * 0.1
    np.save(tmp_path / "maps" / f"a{k}.npy", mp.astype(np.float32))
    img = Image.fromarray(ann, mode="P")
    img.putpalette([0, 0, 0, 106, 153, 78, 232, 168, 56, 193, 69, 69])
    img.save(tmp_path / "ann" / f"a{k}.png")
    rows.append({"id": f"a{k}", "status": "ok", "crop_x0": 0, "crop_y0": 0,
                 "crop_size": 8})
  _write(tmp_path / "scores.csv", rows)
  assert cli.main(["evaluate", "--task", "pixel", "--scores",
                   str(tmp_path / "scores.csv"), "--maps",
                   str(tmp_path / "maps"), "--annotations",
                   str(tmp_path / "ann"), "--out", str(tmp_path / "o"),
                   "--bootstrap", "20"]) == 0
  res = json.load(open(tmp_path / "o" / "metrics.json"))
  assert res["metrics"]["auroc"] == 1.0 and res["metrics"]["dice"] == 1.0
  assert res["n"] == 3


def test_labels_from_a_built_tfds_dataset(tmp_path, capsys):
  """EyeQ test split built from a fixture with the data/ builder; evaluate
  reads its labels (no CSV) and matches them to scores by file stem."""
  pytest.importorskip("tensorflow_datasets")
  m = tmp_path / "manual"
  (m / "test").mkdir(parents=True)
  for i, name in enumerate(("1_left", "2_right", "3_left", "4_left")):
    Image.fromarray(np.full((10, 12, 3), 40 * i, np.uint8)).save(
        m / "test" / f"{name}.jpeg")
  with open(m / "Label_EyeQ_test.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["", "image", "quality", "DR_grade"])
    w.writerows([[0, "1_left.jpeg", 0, 0], [1, "2_right.jpeg", 1, 0],
                 [2, "3_left.jpeg", 2, 0], [3, "4_left.jpeg", 2, 0]])
  (m / "train").mkdir()
  Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(
      m / "train" / "9_left.jpeg")
  with open(m / "Label_EyeQ_train.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["", "image", "quality", "DR_grade"])
    w.writerow([0, "9_left.jpeg", 0, 0])
  import pathlib
  import sys
  repo = str(pathlib.Path(__file__).resolve().parents[1])
  if repo not in sys.path:
    sys.path.insert(0, repo)
  from data import build as data_build
  data_build.build("eyeq", str(m), str(tmp_path / "tfds"))
  _write(tmp_path / "scores.csv", [
      {"id": "1_left", "status": "ok", "grade": "good"},
      {"id": "2_right", "status": "ok", "grade": "reject"},
      {"id": "3_left", "status": "ok", "grade": "reject"},
      {"id": "4_left", "status": "ok", "grade": "usable"}])
  assert cli.main(["evaluate", "--task", "eyeq", "--scores",
                   str(tmp_path / "scores.csv"), "--labels", "tfds:eyeq:test",
                   "--tfds-data-dir", str(tmp_path / "tfds"), "--out",
                   str(tmp_path / "o"), "--bootstrap", "0"]) == 0
  res = json.load(open(tmp_path / "o" / "metrics.json"))
  # y = (0, 1, 2, 2), pred = (0, 2, 2, 1): the hand-computed case above.
  assert res["n"] == 4
  assert res["metrics"]["qwk"] == pytest.approx(1 - 0.5 / 1.375)
  assert res["metrics"]["accuracy"] == 0.5


def test_cli_string_labels_point_to_positive_and_folds_are_stated(
    tmp_path, capsys):
  ids = [f"i{k}" for k in range(10)]
  q = [0.9, 0.8, 0.7, 0.6, 0.55, 0.1, 0.2, 0.3, 0.4, 0.45]
  lab = ["good"] * 3 + ["bad"] * 7  # the smaller class has 3 images
  _write(tmp_path / "scores.csv",
         [{"id": i, "status": "ok", "quality": v} for i, v in zip(ids, q)])
  _write(tmp_path / "labels.csv",
         [{"id": i, "label": v} for i, v in zip(ids, lab)])
  argv = ["evaluate", "--scores", str(tmp_path / "scores.csv"), "--labels",
          str(tmp_path / "labels.csv"), "--out", str(tmp_path / "o"),
          "--bootstrap", "20"]
  assert cli.main(argv) == 2  # default --positive 1 matches no label
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1, err
  assert "--positive '1'" in err and "'bad', 'good'" in err
  assert "pass --positive" in err
  assert cli.main(argv + ["--positive", "good"]) == 0  # --folds 5 asked
  out = capsys.readouterr().out
  assert "Note: 5 folds requested, 3 used: the smaller class has 3 images" \
      in out
  res = json.load(open(tmp_path / "o" / "metrics.json"))
  assert res["folds"] == 3 and res["folds_requested"] == 5
  assert "3 used" in res["note"]
  _write(tmp_path / "labels.csv",
         [{"id": i, "label": "good" if k == 0 else "bad"}
          for k, i in enumerate(ids)])
  assert cli.main(argv + ["--positive", "good"]) == 2
  assert "at least 2 images of each class" in capsys.readouterr().err
