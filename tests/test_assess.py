"""efiqa assess: the output contract, bad inputs, and exact resume."""
import csv
import glob
import json
import os
import shutil

import numpy as np
import pytest

from efiqa_jax import assess as assess_lib
from efiqa_jax import cli

from tests.assess_fixtures import tiny_teacher, write_inputs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("assess")
  teacher = tiny_teacher(root / "teacher")
  paths = write_inputs(str(root / "photos"))
  return root, teacher, paths


def _rows(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def test_contract_on_mixed_inputs(setup):
  root, teacher, paths = setup
  out = str(root / "out")
  missing = str(root / "photos" / "z_missing.png")
  manifest = root / "list.csv"
  with open(manifest, "w") as f:
    f.write("path\n" + "\n".join(paths + [missing]) + "\n")
  code = cli.main(["assess", str(manifest), "--out", out, "--model", teacher,
                   "--batch-size", "4", "--quiet"])
  assert code == assess_lib.EXIT_SOME_FAILED
  rows = _rows(os.path.join(out, "scores.csv"))
  assert [r["image"] for r in rows] == paths + [missing]
  assert list(rows[0].keys()) == list(assess_lib.SCORE_COLUMNS)
  by = {os.path.basename(r["image"]): r for r in rows}
  expect_fail = {"d_empty.jpg": "unreadable", "e_text.png": "unreadable",
                 "f_tiny.png": "too_small", "g_black.png": "no_fov",
                 "i_truncated.jpg": "unreadable",
                 "o_bomb.png": "too_large",
                 "h_astronaut.png": "not_fundus",
                 "j_grey16.png": "not_fundus", "k_grey.png": "not_fundus",
                 "z_missing.png": "not_found"}
  for name, status in expect_fail.items():
    assert by[name]["status"] == status, (name, by[name])
    assert by[name]["message"], name
    assert not os.path.exists(os.path.join(out, "maps", by[name]["id"] +
                                           ".npy"))
  for name in ("a_fundus.png", "b_retina.jpg", "c_fundus.jpg", "l_rgba.png",
               "m_cmyk.jpg", "n_exif.jpg"):
    r = by[name]
    assert r["status"] == "ok", r
    q = float(r["quality"])
    assert 0.0 <= q <= 1.0 and 0.0 <= float(r["degraded_fraction"]) <= 1.0
    assert r["grade"] in ("good", "usable", "reject")
    m = np.load(os.path.join(out, "maps", r["id"] + ".npy"))
    assert m.dtype == np.float32 and m.ndim == 2
    assert m.min() >= 0.0 and m.max() <= 1.0
    assert os.path.exists(os.path.join(out, "overlays", r["id"] + ".png"))
    assert int(r["crop_size"]) > 0 and float(r["fov_r"]) > 0
  # EXIF orientation applied: the crop box refers to the displayed image.
  assert float(by["n_exif.jpg"]["fov_r"]) > 0
  # Map is zero outside the FOV (corners of the crop square).
  m = np.load(os.path.join(out, "maps", by["a_fundus.png"]["id"] + ".npy"))
  assert m[0, 0] == 0 and m[-1, -1] == 0
  # A non-fundus photograph is refused with the reason, not graded.
  assert "not a colour fundus photograph" in by["h_astronaut.png"]["message"]
  assert by["h_astronaut.png"]["quality"] == by["h_astronaut.png"]["grade"] == ""
  report = open(os.path.join(out, "report.html")).read()
  assert "Not assessed" in report and "a_fundus" in report


def test_resume_after_kill_gives_identical_scores(setup):
  root, teacher, paths = setup
  full = str(root / "full")
  res = assess_lib.assess(paths, full, model=teacher, batch_size=2,
                          progress=False)
  assert res.total == len(paths) and res.skipped_done == 0
  ref = open(os.path.join(full, "scores.csv")).read()

  # Simulate a kill: keep 3 finished rows and a line cut mid-write, drop the
  # final outputs and one map whose row was written (map write lost).
  part = str(root / "part")
  shutil.copytree(full, part)
  os.remove(os.path.join(part, "scores.csv"))
  os.remove(os.path.join(part, "report.html"))
  (prog,) = glob.glob(os.path.join(part, ".journal", "p0-*.jsonl"))
  lines = open(prog).read().splitlines()
  with open(prog, "w") as f:
    f.write("\n".join(lines[:3]) + "\n" + lines[3][: len(lines[3]) // 2])
  ok_ids = [json.loads(l)["id"] for l in lines[:3]
            if json.loads(l)["status"] == "ok"]
  os.remove(os.path.join(part, "maps", ok_ids[0] + ".npy"))
  res2 = assess_lib.assess(paths, part, model=teacher, batch_size=2,
                           progress=False)
  assert res2.skipped_done == 2  # the 3 kept rows minus the one without a map
  assert open(os.path.join(part, "scores.csv")).read() == ref
  # Each image once in the final table.
  rows = _rows(os.path.join(part, "scores.csv"))
  assert len({r["id"] for r in rows}) == len(paths)


def test_unknown_model_is_a_usage_error(setup, capsys):
  root, _, paths = setup
  code = cli.main(["assess", paths[0], "--out", str(root / "x"), "--model",
                   str(root / "nope"), "--quiet"])
  assert code == assess_lib.EXIT_USAGE
  assert "unknown model" in capsys.readouterr().err


def test_assess_calls_models_through_the_protocol(setup, tmp_path):
  """assess needs a `quality_model.QualityModel`: the teacher is one (no
  logits; `predict_all` gives `predict`'s maps), anything else is refused
  before any work."""
  from efiqa_jax import quality_model as qm
  root, teacher, paths = setup
  model = qm.load_quality_model(teacher)
  assert isinstance(model, qm.QualityModel) and not model.has_logits
  prep = model.prepare(paths[0])
  assert prep.ok, prep.message
  images, fov = prep.image[None], prep.fov_mask[None]
  out = model.predict_all(images, fov)
  assert out["logits"] is None and out["class_probs"] is None
  np.testing.assert_array_equal(out["maps"], model.predict(images, fov))
  with pytest.raises(TypeError, match="QualityModel"):
    assess_lib.assess(paths[:1], str(tmp_path / "o"), quality_model=object(),
                      progress=False)
  assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_sigkill_mid_run_then_resume(setup):
  import signal
  import subprocess
  import sys
  import time
  root, teacher, paths = setup
  ref_dir = str(root / "ref_kill")
  assess_lib.assess(paths, ref_dir, model=teacher, batch_size=2,
                    progress=False)
  ref = open(os.path.join(ref_dir, "scores.csv")).read()
  out = str(root / "killed")
  cmd = [sys.executable, "-m", "efiqa_jax", "assess", *paths, "--out", out,
         "--model", teacher, "--batch-size", "2", "--quiet"]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(os.path.dirname(os.path.dirname(assess_lib.__file__)))] +
      os.environ.get("PYTHONPATH", "").split(os.pathsep)))
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  journal = os.path.join(out, ".journal", "p0-*.jsonl")
  deadline = time.time() + 240
  try:
    while time.time() < deadline and proc.poll() is None:
      if sum(len(open(f).read().splitlines())
             for f in glob.glob(journal)) >= 2:
        break
      time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert not os.path.exists(os.path.join(out, "scores.csv"))
  res = assess_lib.assess(paths, out, model=teacher, batch_size=2,
                          progress=False)
  assert res.skipped_done >= 2
  assert open(os.path.join(out, "scores.csv")).read() == ref


def test_assess_cli_workers_flag_reaches_the_library(monkeypatch, tmp_path):
  from efiqa_jax import assess as assess_lib
  from efiqa_jax import cli
  seen = {}

  def fake(inputs, out, **kw):
    seen.update(kw)
    raise FileNotFoundError("stop here")

  monkeypatch.setattr(assess_lib, "assess", fake)
  assert cli.main(["assess", str(tmp_path), "--out", str(tmp_path / "o"),
                   "--workers", "3", "--threads", "2", "--quiet"]) != 0
  assert (seen["num_workers"], seen["num_threads"]) == (3, 2)
  cli.main(["assess", str(tmp_path), "--out", str(tmp_path / "o"),
            "--num-workers", "5", "--quiet"])
  assert seen["num_workers"] == 5
