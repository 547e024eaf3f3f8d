"""`efiqa distill` chains pseudo-label -> extract -> train-adapter on
synthetic photographs (tiny teacher and encoder), then the student assesses."""
import csv
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from efiqa_jax import checkpoints
from efiqa_jax import cli
from efiqa_jax import synth
from tests.assess_fixtures import distill_models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_teacher_encoder_and_folder(tmp_path):
  """TMP/teacher, TMP/enc (tiny, random) and an empty TMP/imgs."""
  distill_models(tmp_path)
  imgs = tmp_path / "imgs"
  imgs.mkdir()
  return imgs


def _efiqa_distill_args(tmp_path, imgs, wd, *extra):
  """`efiqa distill` on the tiny models, photograph-frame labels, 64 px."""
  return ["distill", str(imgs), "--teacher", str(tmp_path / "teacher"),
          "--encoder", str(tmp_path / "enc"), "--workdir", str(wd),
          "--preprocess", "efiqa",
          "--config", os.path.join(REPO, "configs/adapter.py:tiny"),
          "--set", "config.size=64", "--set", "config.work_size=96", *extra,
          "--quiet"]


@pytest.mark.slow
def test_distill_chain(tmp_path, capsys):
  imgs = _tiny_teacher_encoder_and_folder(tmp_path)
  for s in range(4):
    Image.fromarray(synth.generate(s, 96).image).save(imgs / f"s{s}.png")
  (imgs / "broken.png").write_bytes(b"not an image")
  wd = tmp_path / "wd"
  args = ["distill", str(imgs), "--teacher", str(tmp_path / "teacher"),
          "--encoder", str(tmp_path / "enc"), "--workdir", str(wd),
          "--config", os.path.join(REPO, "configs/adapter.py:tiny"),
          "--set", "config.size=64", "--set", "config.work_size=96",
          "--set", "config.batch_size=32", "--quiet"]
  assert cli.main(args) == 0
  assert "adapter:" in capsys.readouterr().out
  labels = sorted(os.listdir(wd / "pseudo" / "labels"))
  assert labels == [f"s{s}.png" for s in range(4)]
  assert np.asarray(Image.open(wd / "pseudo" / "labels" / "s0.png")).shape == (
      4, 4)
  rep = json.load(open(wd / "train" / "data.json"))
  assert rep["matched"] == 4 and rep["token_grid"] == [4, 4, 16]
  assert [x[0] for x in rep["not_ok"]] == ["broken"]
  # 4 images x 16 patches / 32 = 2 steps per epoch, 2 epochs.
  assert rep["total_steps"] == 4
  # Re-running finds everything done.
  assert cli.main(args) == 0
  out = tmp_path / "assess"
  assert cli.main(["assess", str(imgs / "s0.png"), "--out", str(out),
                   "--model", "student", "--encoder", str(tmp_path / "enc"),
                   "--adapter", str(wd / "train" / "adapter"), "--quiet"]) == 0
  row = next(csv.DictReader(open(out / "scores.csv")))
  assert row["status"] == "ok"


def test_anomaly_on_photograph_is_map_to_original():
  """Sampling a crop-frame map on the photograph frame == placing it back
  with `fundus.map_to_original` (nearest) where both sample pixel centres."""
  from efiqa_jax import fundus
  from efiqa_jax.student import distill
  a = np.random.default_rng(0).random((50, 50)).astype(np.float32)
  prep = fundus.Prepared(path="", status="ok", message="", crop_x0=10,
                         crop_y0=-20, crop_size=200, orig_h=200, orig_w=200)
  np.testing.assert_array_equal(
      distill.anomaly_on_photograph(a, (10, -20, 200), 200, 200, 200),
      fundus.map_to_original(a, prep, nearest=True))
  np.testing.assert_array_equal(
      distill.anomaly_on_photograph(a, (0, 0, 50), 50, 50, 50), a)


def _fake_pseudo_labels(inputs, teacher, out_dir, *, spec, work_size, **_):
  """`write_pseudo_labels --from-photos` stand-in (no teacher run): the left
  half of every crop square is anomalous."""
  from efiqa_jax import fundus
  from efiqa_jax import pseudo_labels
  from efiqa_jax import sources
  paths = sources.list_inputs(list(inputs))
  rows = []
  for sub in ("anomaly", "labels"):
    os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
  for p, id_ in zip(paths, sources.unique_ids(paths)):
    prep = fundus.prepare_fundus(p, size=work_size)
    rows.append({"image": p, "id": id_, "status": prep.status,
                 "message": prep.message})
    if prep.ok:
      a = np.zeros((64, 64), np.float32)
      a[:, :32] = 1.0
      np.save(os.path.join(out_dir, "anomaly", id_ + ".npy"), a)
      Image.fromarray(pseudo_labels.patch_labels(a, spec)).save(
          os.path.join(out_dir, "labels", id_ + ".png"))
  with open(os.path.join(out_dir, "manifest.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=["image", "id", "status", "message"])
    w.writeheader()
    w.writerows(rows)
  with open(os.path.join(out_dir, "spec.json"), "w") as f:
    json.dump({"from_photos": True, "grid": spec.grid}, f)
  n = sum(r["status"] == "ok" for r in rows)
  return {"total": len(rows), "ok": n, "failed": len(rows) - n}


def test_distill_efiqa_labels_on_the_photograph(tmp_path, monkeypatch,
                                                capsys):
  """--preprocess efiqa: features of the whole photograph, pseudo-labels
  moved from the crop square to the photograph frame, the adapter records
  efiqa; crop-frame labels against efiqa features are refused."""
  from efiqa_jax import config_util
  from efiqa_jax import fundus
  from efiqa_jax import pseudo_labels
  from efiqa_jax.student import train
  monkeypatch.setattr(pseudo_labels, "write_pseudo_labels",
                      _fake_pseudo_labels)
  # The teacher is never run (the labeller above stands in for it): distill
  # only reads its sidecar (which must be a teacher's); a tiny U-Net.
  imgs = _tiny_teacher_encoder_and_folder(tmp_path)
  for s in range(3):  # side bands: the crop square is not the photograph
    im = np.pad(synth.generate(s, 96).image, ((0, 0), (24, 24), (0, 0)))
    Image.fromarray(im).save(imgs / f"s{s}.png")
  wd = tmp_path / "wd"
  args = _efiqa_distill_args(tmp_path, imgs, wd, "--set",
                             "config.batch_size=16", "--set",
                             "config.epochs=1")
  assert cli.main(args) == 0, capsys.readouterr().err
  spec = json.load(open(wd / "pseudo_efiqa" / "spec.json"))
  assert spec["frame"] == "efiqa" and spec["rule"]["grid"] == 4
  for s in range(3):
    p = str(imgs / f"s{s}.png")
    prep = fundus.prepare_fundus(p, size=96)
    got = np.asarray(Image.open(wd / "pseudo_efiqa" / "labels" / f"s{s}.png"))
    # Independently: the share of each cell's original pixels (4 x 4 cells
    # over the whole 96 x 144 photograph) in the crop square's left half.
    ys, xs = np.mgrid[0:96, 0:144] + 0.5
    x0, y0, side = prep.crop_x0, prep.crop_y0, prep.crop_size
    bad = ((xs >= x0) & (xs < x0 + side / 2) & (ys >= y0) & (ys < y0 + side))
    frac = bad.reshape(4, 24, 4, 36).mean(axis=(1, 3))
    sure = np.abs(frac - 0.9) > 0.05
    assert sure.sum() >= 12
    np.testing.assert_array_equal(got[sure], np.where(frac[sure] >= 0.9, 255,
                                                      0))
    assert got[:, 0].max() == 0  # the left band is outside the crop square
  feats = json.load(open(wd / "features" / "metadata.json"))
  assert feats["preprocess"] == "efiqa" and feats["size"] == 64
  meta = checkpoints.read_meta(wd / "train" / "adapter")
  assert (meta["features"]["preprocess"], meta["features"]["size"]) == (
      "efiqa", 64)
  # The crop-frame labels do not fit whole-photograph features.
  c = config_util.load_config(os.path.join(REPO, "configs/adapter.py:tiny"))
  c.features_dir, c.labels_dir = str(wd / "features"), str(wd / "pseudo")
  with pytest.raises(ValueError, match="FOV crop but the encoder inputs "
                     "are efiqa"):
    train.train_and_evaluate(c, str(tmp_path / "wd2"))
  # Nor does an explicit config.preprocess that the features contradict.
  c.labels_dir, c.preprocess = str(wd / "pseudo_efiqa"), "fov"
  with pytest.raises(ValueError, match="made with efiqa"):
    train.train_and_evaluate(c, str(tmp_path / "wd3"))


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_distill_exactly_once(tmp_path):
  """`efiqa distill --preprocess efiqa` on 2 processes started by the
  global flags: pseudo-labels, photograph-frame labels, features and the
  adapter each once (every input one row, the photograph-frame labels as
  one process makes them, one metrics row per logged step, one report)."""
  from efiqa_jax.encoders import extract as features
  from efiqa_jax import metric_writers
  from efiqa_jax import pseudo_labels
  from efiqa_jax.student import distill
  from tests import multihost
  imgs = _tiny_teacher_encoder_and_folder(tmp_path)
  for s in range(4):
    im = np.pad(synth.generate(s, 96).image, ((0, 0), (24, 24), (0, 0)))
    Image.fromarray(im).save(imgs / f"s{s}.png")
  (imgs / "broken.png").write_bytes(b"not an image")
  wd = tmp_path / "wd"
  args = _efiqa_distill_args(tmp_path, imgs, wd, "--set",
                             "config.batch_size=32", "--batch-size", "2")
  res, _ = multihost.run_efiqa(lambda i: args, 2, devices=1,
                               what="2-process distill")
  report = re.compile(r"^step \d+/\d+ loss .*; adapter: ", re.M)
  assert [bool(report.search(log)) for _, log in res] == [True, False], (
      res[0][1][-2000:] + res[1][1][-2000:])
  ids = ["broken"] + [f"s{s}" for s in range(4)]
  rows = list(csv.DictReader(open(wd / "pseudo" / "manifest.csv")))
  assert sorted(r["id"] for r in rows) == ids
  assert [r["id"] for r in rows if r["status"] != "ok"] == ["broken"]
  assert sorted(r["id"] for r in features.read_manifest(wd / "features")
                ) == ids
  got = sorted(os.listdir(wd / "pseudo_efiqa" / "labels"))
  assert got == [f"s{s}.png" for s in range(4)]
  sp = json.load(open(wd / "pseudo" / "spec.json"))
  spec = pseudo_labels.LabelSpec(threshold=sp["threshold"], grid=sp["grid"],
                                 relax=sp["relax"])
  distill.photograph_labels(str(wd / "pseudo"), str(tmp_path / "ref"), spec,
                            work_size=96)
  for name in got:
    np.testing.assert_array_equal(
        np.asarray(Image.open(wd / "pseudo_efiqa" / "labels" / name)),
        np.asarray(Image.open(tmp_path / "ref" / "labels" / name)))
  rep = json.load(open(wd / "train" / "data.json"))
  assert rep["matched"] == 4 and rep["total_steps"] == 4
  steps = [r["step"] for r in metric_writers.read_metrics(wd / "train")]
  assert steps and len(steps) == len(set(steps)), steps
  assert (wd / "train" / "adapter" / checkpoints.SIDECAR).exists()
