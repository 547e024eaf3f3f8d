"""efiqa pseudo-label and efiqa benchmark end to end with a tiny teacher."""
import csv
import os

import numpy as np
import pytest
from PIL import Image

from efiqa_jax import cli
from efiqa_jax import pseudo_labels as pl

from tests.assess_fixtures import fundus_like, tiny_teacher


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  return tiny_teacher(tmp_path_factory.mktemp("t") / "teacher")


def test_pseudo_label_vessel_maps_and_photos(teacher, tmp_path, capsys):
  vm = tmp_path / "maps"
  (vm / "a").mkdir(parents=True)
  (vm / "b").mkdir()
  rng = np.random.default_rng(0)
  for sub in ("a", "b"):  # the same stem twice: ids must stay unique
    Image.fromarray((rng.random((100, 100)) * 255).astype(np.uint8)).save(
        vm / sub / "x.png")
  (vm / "a" / "broken.png").write_text("nope")
  out = tmp_path / "out"
  code = cli.main(["pseudo-label", str(vm), "--teacher", teacher, "--out",
                   str(out), "--grid", "4", "--quiet"])
  assert code == 3  # one input failed, still every row written
  rows = list(csv.DictReader(open(out / "manifest.csv")))
  assert [r["status"] for r in rows] == ["unreadable", "ok", "ok"]
  ids = [r["id"] for r in rows]
  assert len(set(ids)) == 3
  for r in rows[1:]:
    a = np.load(out / "anomaly" / (r["id"] + ".npy"))
    assert a.shape == (64, 64) and a.dtype == np.float32
    lab = np.asarray(Image.open(out / "labels" / (r["id"] + ".png")))
    assert lab.shape == (4, 4)
    np.testing.assert_array_equal(
        lab, pl.patch_labels(a, pl.LabelSpec(grid=4)))

  # Re-running into the folder resumes: finished files are kept as they are.
  stamp = {r["id"]: os.path.getmtime(out / "labels" / (r["id"] + ".png"))
           for r in rows[1:]}
  os.remove(out / "labels" / (rows[2]["id"] + ".png"))
  code = cli.main(["pseudo-label", str(vm), "--teacher", teacher, "--out",
                   str(out), "--grid", "4", "--quiet"])
  assert code == 3
  assert [r["status"] for r in csv.DictReader(open(out / "manifest.csv"))] \
      == ["unreadable", "ok", "ok"]
  assert os.path.getmtime(out / "labels" / (rows[1]["id"] + ".png")) == \
      stamp[rows[1]["id"]]
  assert os.path.exists(out / "labels" / (rows[2]["id"] + ".png"))
  # ... but not with another rule.
  code = cli.main(["pseudo-label", str(vm), "--teacher", teacher, "--out",
                   str(out), "--grid", "4", "--threshold", "0.05", "--quiet"])
  assert code == 2
  err = capsys.readouterr().err
  assert "other settings" in err and "rule.threshold" in err, err
  assert len(err.strip().splitlines()) == 1, err
  # --overwrite redoes everything with the new rule.
  code = cli.main(["pseudo-label", str(vm), "--teacher", teacher, "--out",
                   str(out), "--grid", "4", "--threshold", "0.05", "--quiet",
                   "--overwrite"])
  assert code == 3
  a = np.load(out / "anomaly" / (rows[1]["id"] + ".npy"))
  np.testing.assert_array_equal(
      np.asarray(Image.open(out / "labels" / (rows[1]["id"] + ".png"))),
      pl.patch_labels(a, pl.LabelSpec(threshold=0.05, grid=4)))

  photos = tmp_path / "photos"
  photos.mkdir()
  Image.fromarray(fundus_like(seed=4)).save(photos / "p.png")
  out2 = tmp_path / "out2"
  code = cli.main(["pseudo-label", str(photos), "--teacher", teacher,
                   "--out", str(out2), "--from-photos", "--mode", "soft",
                   "--quiet"])
  assert code == 0
  assert np.load(out2 / "anomaly" / "p.npy").shape == (64, 64)
  assert np.asarray(Image.open(out2 / "labels" / "p.png")).shape == (14, 14)


def test_benchmark_reports_model_and_baseline(tmp_path, capsys):
  """The bundled model against heavy blur and haze on scikit-image's retina
  photograph: both degraded versions rank below the clean one and its maps
  find the damage better than the vessel-density baseline (measured: map
  AUROC 0.911 vs 0.689, haze quality drop 0.356)."""
  from skimage import data
  Image.fromarray(data.retina()).resize((320, 320)).save(tmp_path / "r.png")
  js = tmp_path / "bench.json"
  code = cli.main(["benchmark", str(tmp_path / "r.png"), "--model", "default",
                   "--kinds", "blur,haze", "--severities", "0.9",
                   "--json", str(js), "--quiet"])
  assert code == 0
  out = capsys.readouterr().out
  import json
  res = json.load(open(js))
  assert res["n_photos"] == 1 and res["n_variants"] == 2
  assert set(res["per_kind"]) == {"blur", "haze"}
  assert res["hiding"]["kinds"] == ["blur", "haze"]  # both hide vessels
  assert res["image_auroc"] == 1.0
  assert res["map_auroc"] >= 0.85 and res["baseline_map_auroc"] <= 0.75
  assert res["per_kind"]["haze"]["quality_drop"] >= 0.25
  # The printed table is the JSON's.
  assert (f"| map AUROC | {res['map_auroc']:.3f} | "
          f"{res['baseline_map_auroc']:.3f} |") in out


def test_pseudo_label_takes_the_bundled_teacher_by_name(tmp_path):
  """`--teacher default` (as `assess --model default`): the bundled teacher,
  its calibrated rule and work size, on the bundled sample photographs."""
  from efiqa_jax import checkpoints, default_model
  out = tmp_path / "out"
  assert cli.main(["pseudo-label", default_model.SAMPLES_DIR, "--teacher",
                   "default", "--from-photos", "--out", str(out),
                   "--quiet"]) == 0
  rows = list(csv.DictReader(open(out / "manifest.csv")))
  assert len(rows) == 4 and {r["status"] for r in rows} == {"ok"}
  side = checkpoints.read_meta(default_model.MODEL_DIR)["image_size"]
  assert np.load(out / "anomaly" / (rows[0]["id"] + ".npy")).shape == (
      side, side)
  run = (out / "run.json").read_text()
  assert default_model.MODEL_DIR in run or "efiqa-default-teacher" in run, run
