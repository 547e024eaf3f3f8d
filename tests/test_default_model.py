"""The bundled default model: recipe recorded, size, and a held-out check on
real photographs it never saw (../shared/data/fundus)."""
import csv
import json
import os

import numpy as np
import pytest

from efiqa_jax import assess as assess_lib
from efiqa_jax import checkpoints
from efiqa_jax import default_model


def _dir_size(path):
  return sum(os.path.getsize(os.path.join(r, f))
             for r, _, fs in os.walk(path) for f in fs)


def test_bundled_model_is_small_and_self_describing(repo_root):
  meta = checkpoints.read_meta(default_model.MODEL_DIR)
  assert _dir_size(default_model.MODEL_DIR) <= 10 * 2**20
  assert meta["built_by"].startswith("efiqa build-default-model --config ")
  cfg = meta["built_by"].split("--config ")[1].split()[0]
  assert os.path.isfile(repo_root / cfg)
  cal = meta["calibration"]
  assert cal["anomaly_threshold"] == meta["anomaly_threshold"]
  assert 0 < meta["grading"]["usable_min"] < meta["grading"]["good_min"] < 1
  # It finds erased vessels on its own calibration data (recorded, not tuned
  # here): far better than chance.
  assert cal["map_auroc"] > 0.8
  model, _ = checkpoints.load_model(default_model.MODEL_DIR)
  assert model.residual


@pytest.fixture(scope="module")
def real_scores(tmp_path_factory, fundus_dir):
  out = str(tmp_path_factory.mktemp("real"))
  photos = sorted(str(p) for p in fundus_dir.rglob("*")
                  if p.suffix in (".png", ".jpg") and "vessels" not in p.name)
  res = assess_lib.assess(photos, out, batch_size=8, progress=False)
  rows = list(csv.DictReader(open(res.scores_csv)))
  # The DRIVE FOV masks are refused by the fundus gate; every photograph
  # is assessed.
  refused = sorted(r["id"] for r in rows if r["status"] != "ok")
  assert refused == ["01_fov_mask", "02_fov_mask"] and res.failed == 2, rows
  assert all(r["status"] == "not_fundus" for r in rows
             if r["id"] in refused), rows
  return {r["id"]: r for r in rows}, out


def test_held_out_real_photographs_are_ranked(real_scores):
  rows, _ = real_scores
  q = {k: float(r["quality"]) for k, r in rows.items() if r["status"] == "ok"}
  good = [q[k] for k in ("01_image", "02_image", "1", "11", "100")]
  # EyeQ grades 6834_left Reject; 116_right is hazy.
  for bad in ("6834_left", "116_right"):
    assert q[bad] < min(good), (bad, q)
    assert rows[bad]["grade"] == "reject", rows[bad]
  # Good photographs are not rejected wholesale: the best is graded good.
  assert max(good) >= float(json.loads(open(os.path.join(
      default_model.MODEL_DIR, "calibration.json")).read())["good_min"])


def test_maps_localise_blur_on_a_real_photograph(tmp_path):
  from efiqa_jax import fundus, synth
  from efiqa_jax import quality_model as qm
  model = qm.load_quality_model("default")
  p = fundus.prepare_fundus(os.path.join(default_model.SAMPLES_DIR,
                                         "retina.jpg"), model.work_size)
  # Blur only the left half of the field of view.
  img, mask, _ = synth.degrade(p.image, p.fov_mask, 0, kinds=["blur"],
                               severity=1.0)
  half = np.zeros(p.fov_mask.shape, bool)
  half[:, : half.shape[1] // 2] = True
  mixed = np.where(half[..., None], img, p.image)
  maps = model.predict(np.stack([p.image, mixed]),
                       np.stack([p.fov_mask, p.fov_mask]))
  from efiqa_jax import quality
  w = quality.fov_at(p.fov_mask, maps.shape[1:])
  hw = quality.fov_at(half & p.fov_mask, maps.shape[1:])
  left = lambda m: float((m * hw).sum() / hw.sum())
  right = lambda m: float((m * (w - hw)).sum() / (w - hw).sum())
  # The blurred half lights up; the untouched half stays near the clean map.
  assert left(maps[1]) > left(maps[0]) + 0.2, (left(maps[1]), left(maps[0]))
  assert abs(right(maps[1]) - right(maps[0])) < 0.1
  del mask


@pytest.mark.slow
def test_build_default_model_recipe_runs_tiny(tmp_path, repo_root):
  from efiqa_jax import cli
  out = tmp_path / "model"
  code = cli.main(["build-default-model", "--config",
                   str(repo_root / "configs" / "teacher_default.py") + ":tiny",
                   "--workdir", str(tmp_path / "work"), "--out", str(out),
                   "--calib-n", "8"])
  assert code == 0
  meta = checkpoints.read_meta(out)
  assert meta["name"] == "efiqa-default-teacher"
  assert "threshold_sweep" in meta["calibration"]
  res = assess_lib.assess(default_model.SAMPLES_DIR, str(tmp_path / "a"),
                          model=str(out), progress=False)
  assert res.ok == 4
