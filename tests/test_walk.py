"""A newcomer's whole walk (issue 15): the wheel of the checkout, installed
into a fresh virtualenv without any extra, run from a folder outside the
repository, through every command from the quickstart to the evaluation of
a student. Tiny everything; each step's outputs are checked, not only its
exit code. Whatever fails here is a bug a wheel user meets (a missing
package folder, a config only found from the repository root, a tiny config
a later command refuses, ...)."""
import csv
import json
import pathlib
import subprocess

import numpy as np
import pytest
from PIL import Image

from tests import conftest
from tests import fresh_install

pytestmark = pytest.mark.slow

N_PHOTOS = 12
GRID = 4  # configs/encoder_mim.py:tiny: 64 px in 16-px patches


@pytest.fixture(scope="session")
def core_venv(tmp_path_factory, efiqa_wheel):
  """`pip install WHEEL` into a fresh virtualenv, once per run."""
  return fresh_install.core_venv(conftest._run_dir(tmp_path_factory),  # pylint: disable=protected-access
                                 efiqa_wheel)


def _env(venv):
  env = fresh_install.pip_env(venv)
  # A newcomer's machine: one CPU device, no test settings.
  for k in ("XLA_FLAGS", "MPLBACKEND", "CI"):
    env.pop(k, None)
  return env


def _rows(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def test_newcomer_walk_from_a_wheel(tmp_path, core_venv):
  venv = pathlib.Path(core_venv)
  walk = tmp_path / "walk"
  walk.mkdir()
  assert fresh_install.REPO not in walk.parents
  env = _env(venv)
  py = str(fresh_install.venv_python(venv))

  def run(*args, expect=0):
    res = subprocess.run(list(map(str, args)), cwd=walk, env=env, capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == expect, (
        f"{' '.join(map(str, args))} -> {res.returncode}\n"
        f"{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    return res.stdout, res.stderr

  def efiqa(*args):
    return run(str(venv / "bin" / "efiqa"), *map(str, args))

  # The installed package, not the checkout; no TensorFlow in the core
  # install's whole dependency closure (not only in the wheel's metadata).
  out, _ = run(py, "-c", (
      "import importlib.util, importlib.metadata, json, efiqa_jax\n"
      "print(json.dumps({'file': efiqa_jax.__file__, 'found': [m for m in "
      "('tensorflow', 'tensorboard', 'torch') if importlib.util.find_spec(m)],"
      " 'dists': sorted(d.metadata['Name'].lower() for d in "
      "importlib.metadata.distributions())}))"))
  info = json.loads(out)
  pkg = pathlib.Path(info["file"]).parent
  assert venv in pkg.parents, info["file"]
  assert info["found"] == [], info["found"]
  assert not [d for d in info["dists"] if d.startswith(
      ("tensorflow-cpu", "tensorflow-intel", "tensorboard", "torch"))
              or d == "tensorflow"], info["dists"]

  # 1. The quickstart, on the samples inside the installed package.
  out, _ = efiqa("assess", pkg / "assets" / "samples", "--out", "results",
                 "--quiet")
  rows = {r["id"]: r for r in _rows(walk / "results" / "scores.csv")}
  assert set(rows) == {"retina", "retina_blur", "retina_haze", "synthetic"}
  assert {r["status"] for r in rows.values()} == {"ok"}, rows
  assert {r["model"] for r in rows.values()} == {"default"}
  assert float(rows["retina"]["quality"]) > float(
      rows["retina_blur"]["quality"])
  assert len(list((walk / "results" / "maps").glob("*.npy"))) == 4
  assert "<img" in (walk / "results" / "report.html").read_text()

  # 2. Synthetic photographs (with their degradation grades).
  efiqa("synth", "--n", N_PHOTOS, "--out", "synth", "--size", 256,
        "--clean-fraction", 0.5, "--quiet")
  labels = _rows(walk / "synth" / "labels.csv")
  assert len(labels) == N_PHOTOS
  assert all((walk / "synth" / r["image"]).is_file() for r in labels)
  grades = [r["grade"] for r in labels]
  assert grades.count("good") >= 2 and len(grades) - grades.count("good") >= 2

  # 2b. ... built into a TFDS dataset and read back, TensorFlow absent
  # (data/ is the repository's: the builders are not in the wheel).
  run(py, fresh_install.REPO / "data" / "build.py", "efiqa_synth",
      "--manual_dir", "synth", "--data_dir", "tfds")
  out, _ = run(py, "-c", (
      "import sys, tensorflow_datasets as tfds\n"
      "ds = tfds.data_source('efiqa_synth', split='train', data_dir='tfds',"
      " download=False)\n"
      "print(len(ds), ds[0]['image'].shape, 'tensorflow' in sys.modules)"))
  assert out.strip().splitlines()[-1] == f"{N_PHOTOS} (256, 256, 3) False", out

  # 3. A teacher, its config found by name (no configs/ folder here); the
  # missing TensorBoard is one line naming the extra.
  out, err = efiqa("train-teacher", "--config", "teacher:tiny", "--workdir",
                   "teacher")
  assert "trained 8/8 steps" in out and "final loss nan" not in out, out
  assert "pip install 'efiqa-jax[tf]'" in err
  meta = json.loads((walk / "teacher" / "export" / "efiqa.json").read_text())
  assert meta["image_size"] == 64 and meta["steps"] == 8

  # 4. Calibrated label-free (synthetic photographs: tiny teacher, so its
  # rule is flagged as not to be trusted, but written and usable), at a
  # 256-px crop that pseudo-label then keeps.
  efiqa("calibrate-teacher", "teacher/export", "--out", "teacher_cal",
        "--n", 8, "--work-size", 256, "--quiet")
  cal = json.loads((walk / "teacher_cal" / "efiqa.json").read_text())
  assert cal["work_size"] == 256
  assert cal["pseudo_labels"]["threshold"] > 0
  assert 0 <= cal["grading"]["usable_min"] <= cal["grading"]["good_min"] <= 1

  # 5. Pseudo-labels on the student's token grid.
  efiqa("pseudo-label", "synth/images", "--from-photos", "--teacher",
        "teacher_cal", "--out", "pseudo", "--grid", GRID, "--quiet")
  man = _rows(walk / "pseudo" / "manifest.csv")
  assert len(man) == N_PHOTOS and {r["status"] for r in man} == {"ok"}
  assert '"work_size": 256' in (walk / "pseudo" / "run.json").read_text()
  lab = np.asarray(Image.open(walk / "pseudo" / "labels" / f"{man[0]['id']}.png"))
  assert lab.shape == (GRID, GRID) and set(np.unique(lab)) <= {0, 255}

  # 6. An encoder, its config by the README's path spelling (configs/...,
  # which is not here: the bundled file).
  assert not (walk / "configs").exists()
  efiqa("pretrain-encoder", "synth/images", "--out", "encoder", "--config",
        "configs/encoder_mim.py:tiny", "--quiet")
  assert (walk / "encoder" / "efiqa.json").is_file()

  # 7. Its features, at the size it was trained at.
  efiqa("extract", "synth/images", "--encoder", "encoder", "--out", "feats",
        "--quiet")
  feats = _rows(walk / "feats" / "manifest.csv")
  assert len(feats) == N_PHOTOS and {r["status"] for r in feats} == {"ok"}
  f0 = np.load(walk / "feats" / feats[0]["file"])
  assert f0.shape[:2] == (GRID, GRID) and np.isfinite(f0).all()
  assert json.loads((walk / "feats" / "metadata.json").read_text())[
      "size"] == 64

  # 8. The adapter, its config by a real file path.
  efiqa("train-adapter", "--config", f"{pkg / 'configs' / 'adapter.py'}:tiny",
        "--workdir", "adapter", "config.features_dir=feats",
        "config.labels_dir=pseudo")
  assert (walk / "adapter" / "adapter" / "efiqa.json").is_file()
  losses = [json.loads(ln)["loss"] for ln in
            (walk / "adapter" / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in ln]
  assert losses and np.isfinite(losses).all()

  # 9. The student assesses the photographs.
  efiqa("assess", "synth/labels.csv", "--out", "student", "--model",
        "student", "--encoder", "encoder", "--adapter", "adapter/adapter",
        "--quiet")
  scores = _rows(walk / "student" / "scores.csv")
  assert [r["id"] for r in scores] == [r["id"] for r in labels]
  assert {r["status"] for r in scores} == {"ok"}
  assert all(0 <= float(r["quality"]) <= 1 for r in scores)
  m = np.load(walk / "student" / "maps" / f"{scores[0]['id']}.npy")
  assert m.shape == (GRID, GRID)

  # 10. Evaluated against the synthetic grades.
  out, _ = efiqa("evaluate", "--scores", "student/scores.csv", "--labels",
                 "synth/labels.csv", "--label-column", "grade", "--positive",
                 "good", "--folds", 2, "--bootstrap", 50, "--out", "eval")
  res = json.loads((walk / "eval" / "metrics.json").read_text())
  assert res["n"] == N_PHOTOS and res["folds"] == 2, res
  assert res["positives"] == grades.count("good"), res
  assert 0 <= res["metrics"]["auroc"] <= 1, res
  assert 0 <= res["metrics"]["bacc"] <= 1, res
  assert (walk / "eval" / "metrics.md").is_file()
