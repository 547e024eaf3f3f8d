"""efiqa calibrate-teacher: the pseudo-label rule fitted on erasures, and
where it is read back (pseudo-label, distill). (The trainers' metric writer
without TensorFlow: tests/test_trainer.py.)"""
import json

import numpy as np
import pytest
from PIL import Image

from efiqa_jax import checkpoints, cli
from efiqa_jax.teacher import calibration
from efiqa_jax import pseudo_labels as pl

from tests.assess_fixtures import fundus_like, tiny_teacher


def _cells(shares, cell=8):
  """(g, g) shares -> (g*cell, g*cell) 0/1 pixels with exactly that share
  of each cell's pixels set (in raster order)."""
  g = shares.shape[0]
  out = np.zeros((g * cell, g * cell), np.float32)
  for i in range(g):
    for j in range(g):
      k = int(round(shares[i, j] * cell * cell))
      blk = np.zeros(cell * cell, np.float32)
      blk[:k] = 1
      out[i * cell:(i + 1) * cell, j * cell:(j + 1) * cell] = blk.reshape(
          cell, cell)
  return out


def test_fit_label_relax_finds_the_separating_share():
  rng = np.random.default_rng(0)
  g = 8
  erased = rng.random((3, g, g)) < 0.3
  # Erased cells: 40/64 anomalous pixels (0.625); intact ones 20/64 (0.31),
  # so shares 0.4, 0.5 and 0.6 separate them and 0.75 / 0.9 miss them all.
  shares = np.where(erased, 40 / 64, 20 / 64)
  anomaly = np.stack([_cells(s) for s in shares]) * 0.05  # |f(x)| 0 or 0.05
  erase = np.stack([_cells(e.astype(float)) for e in erased])
  fov = np.ones_like(erase)
  relax, bacc, sweep = calibration.fit_label_relax(anomaly, fov, erase,
                                                     0.02, g)
  assert relax == 0.4 and bacc == pytest.approx(1.0)  # first of the best
  assert sweep["0.5"] == sweep["0.6"] == 1.0
  assert sweep["0.75"] == pytest.approx(0.5) and sweep["0.1"] == 0.5
  # Cells outside the FOV do not count: blank half the field of view.
  fov[:, :, : g * 4] = 0
  _, bacc2, _ = calibration.fit_label_relax(anomaly * fov, fov, erase, 0.02,
                                              g)
  assert bacc2 == pytest.approx(1.0)


def test_teacher_label_spec_order(tmp_path):
  t = tiny_teacher(tmp_path / "t")
  spec, src = pl.teacher_label_spec(t, 16)
  assert (spec.threshold, spec.relax, spec.grid) == (0.02, 0.9, 16)
  assert src == "threshold reference, relax reference"
  model, meta = checkpoints.load_model(t)
  meta = {k: v for k, v in meta.items()
          if k not in ("format", "version", "architecture", "kwargs")}
  cal = str(tmp_path / "cal")
  checkpoints.save_model(cal, model, dict(meta, pseudo_labels={
      "threshold": 0.011, "relax": 0.5, "grid": 32}))
  spec, src = pl.teacher_label_spec(cal, 14)
  assert (spec.threshold, spec.relax, spec.grid) == (0.011, 0.5, 14)
  assert src == "threshold calibrated, relax calibrated"
  spec, src = pl.teacher_label_spec(cal, 14, threshold=0.03)
  assert (spec.threshold, spec.relax) == (0.03, 0.5)
  assert src == "threshold given, relax calibrated"


def test_calibrate_teacher_cli_then_pseudo_label_uses_the_rule(tmp_path,
                                                              capsys):
  t = tiny_teacher(tmp_path / "t")
  out = tmp_path / "cal"
  assert cli.main(["calibrate-teacher", t, "--out", str(out), "--n", "2",
                   "--label-grid", "16", "--quiet"]) == 0
  assert "pseudo-labels |f(x)| >" in capsys.readouterr().out
  meta = checkpoints.read_meta(str(out))
  rule, cal = meta["pseudo_labels"], meta["calibration"]
  assert rule["threshold"] == meta["anomaly_threshold"] == \
      cal["anomaly_threshold"] == meta["map"]["threshold"]
  assert meta["map"]["window"] in calibration.WINDOWS
  # 2 synthetic photographs and the retina photograph's 8 orientations, each
  # clean, under the vessel-hiding kinds at 3 severities and twice erased.
  assert cal["n_images"] == 10 * (1 + 6 * 3 + 2)
  # A swept threshold or the clean floor itself, never below the floor.
  assert (rule["threshold"] in calibration.THRESHOLDS
          or rule["threshold"] == cal["clean_floor"]), rule
  assert rule["threshold"] >= cal["clean_floor"]
  assert rule["relax"] in calibration.RELAXES and rule["grid"] == 16
  assert set(cal["relax_sweep"]) == {str(r) for r in calibration.RELAXES}
  assert round(cal["label_balanced_accuracy"], 4) == max(
      cal["relax_sweep"].values())
  assert meta["work_size"] == 128 and meta["image_size"] == 64
  assert json.load(open(out / "calibration.json"))["label_relax"] == \
      rule["relax"]
  # The calibrated copy loads as the same network.
  a, _ = checkpoints.load_model(t)
  b, _ = checkpoints.load_model(str(out))
  x = np.random.default_rng(0).random((1, 64, 64, 3)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(a(x)), np.asarray(b(x)))

  photos = tmp_path / "photos"
  photos.mkdir()
  Image.fromarray(fundus_like(seed=2)).save(photos / "p.png")
  po = tmp_path / "pl"
  assert cli.main(["pseudo-label", str(photos), "--teacher", str(out),
                   "--out", str(po), "--from-photos", "--grid", "8",
                   "--quiet"]) == 0
  spec = json.load(open(po / "spec.json"))
  assert (spec["threshold"], spec["relax"], spec["grid"]) == (
      rule["threshold"], rule["relax"], 8)
  # At the crop side the rule was measured at (not 512).
  assert json.load(open(po / "run.json"))["settings"]["work_size"] == 128
  a = np.load(po / "anomaly" / "p.npy")
  np.testing.assert_array_equal(
      np.asarray(Image.open(po / "labels" / "p.png")),
      pl.patch_labels(a, pl.LabelSpec(threshold=rule["threshold"], grid=8,
                                      relax=rule["relax"])))
  # Explicit flags still win.
  po2 = tmp_path / "pl2"
  assert cli.main(["pseudo-label", str(photos), "--teacher", str(out),
                   "--out", str(po2), "--from-photos", "--grid", "8",
                   "--threshold", "0.02", "--relax", "0.9", "--quiet"]) == 0
  assert json.load(open(po2 / "spec.json"))["relax"] == 0.9


def test_calibrate_teacher_warns_when_the_calibration_means_nothing(
    tmp_path, capsys):
  """A teacher that fills in nothing (all weights 0: |f(x)| = 0) cannot
  find damage: the command says so in one line instead of shipping grades."""
  import jax
  from flax import nnx
  t = tiny_teacher(tmp_path / "t")
  model, meta = checkpoints.load_model(t)
  graphdef, state = nnx.split(model)
  state = jax.tree.map(lambda x: x * 0, state)
  z = str(tmp_path / "zero")
  checkpoints.save_model(z, nnx.merge(graphdef, state), {
      k: v for k, v in meta.items()
      if k not in ("format", "version", "architecture", "kwargs")})
  assert cli.main(["calibrate-teacher", z, "--out", str(tmp_path / "c"),
                   "--n", "1", "--quiet"]) == 0
  err = capsys.readouterr().err
  assert "not to be trusted" in err and "AUROC 0.50" in err
  assert len([l for l in err.splitlines() if "warning" in l]) == 1
  cal = checkpoints.read_meta(str(tmp_path / "c"))["calibration"]
  assert cal["map_auroc"] == pytest.approx(0.5) and cal["warnings"]


def test_calibrate_teacher_rejects_an_encoder(tmp_path, capsys):
  from flax import nnx
  from efiqa_jax.models import vit
  enc = str(tmp_path / "enc")
  checkpoints.save_model(enc, vit.VisionTransformer(
      patch_size=16, hidden_size=32, depth=1, num_heads=2, mlp_hidden=64,
      rngs=nnx.Rngs(0)))
  assert cli.main(["calibrate-teacher", enc, "--out",
                   str(tmp_path / "o"), "--quiet"]) == 2
  err = capsys.readouterr().err
  assert "not a teacher" in err or "expected a teacher" in err, err


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_calibrate_once_as_one_process(tmp_path):
  """`efiqa calibrate-teacher` on 2 processes started by the global flags:
  each runs the teacher on its half of the photographs, one gather, one
  calibration written by process 0 -- the same calibration.json and sidecar
  as one process; the unusable photograph is recorded once; one report."""
  from tests import multihost
  t = tiny_teacher(tmp_path / "t")
  photos = tmp_path / "photos"
  photos.mkdir()
  for s in range(3):
    Image.fromarray(fundus_like(seed=s)).save(photos / f"p{s}.png")
  (photos / "broken.png").write_bytes(b"not an image")

  def args(out):
    return ["calibrate-teacher", t, "--out", str(tmp_path / out), "--photos",
            str(photos), "--split", "all", "--label-grid", "8", "--quiet"]

  two, _ = multihost.run_efiqa(lambda i: args("two"), 2, devices=1,
                               what="2-process calibrate-teacher")
  one, _ = multihost.run_efiqa(lambda i: args("one"), 1, devices=1,
                               what="1-process calibrate-teacher")
  assert sum("wrote " in log for _, log in two) == 1, two[1][1][-2000:]
  assert "wrote " in two[0][1]
  got = json.load(open(tmp_path / "two" / "calibration.json"))
  want = json.load(open(tmp_path / "one" / "calibration.json"))
  assert got == want
  assert got["n_images"] == 3 * (1 + 6 * 3 + 2)
  assert [s["path"] for s in got["data"]["skipped"]] == [
      str(photos / "broken.png")]
  a, b = (checkpoints.read_meta(str(tmp_path / d)) for d in ("two", "one"))
  # The sidecar records the command that calibrated it (its --out differs).
  for meta, d in ((a, "two"), (b, "one")):
    by = meta.pop("calibrated_by")
    assert by["command"] == " ".join(args(d)).replace(
        "calibrate-teacher", "efiqa calibrate-teacher").replace(
            " --quiet", ""), by
    assert meta["name"] == "tiny-test-teacher"  # the teacher's own record kept
  assert a == b and a["calibration"] == got
