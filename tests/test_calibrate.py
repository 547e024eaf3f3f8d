"""`efiqa calibrate` (the paper's weighted pooling W, tau with stratified
K-fold) and its use by `efiqa assess --model student --calibration`."""
import csv
import json

import numpy as np
from PIL import Image

from flax import nnx

from efiqa_jax import calibrate
from efiqa_jax import checkpoints
from efiqa_jax import cli
from efiqa_jax.models import adapters
from efiqa_jax.models import vit


def _fixture(tmp_path, n=200, g=6, seed=0):
  """Maps where only the centre matters: mean pooling is a poor score."""
  rng = np.random.default_rng(seed)
  d = tmp_path / "assess"
  (d / "maps").mkdir(parents=True)
  rows, labels = [], []
  for i in range(n):
    m = rng.random((g, g)).astype(np.float32)
    ok = m[2:4, 2:4].mean() < 0.5
    np.save(d / "maps" / f"m{i}.npy", m)
    rows.append({"id": f"m{i}", "status": "ok"})
    labels.append({"id": f"m{i}", "label": int(ok)})
  for path, rr in ((d / "scores.csv", rows), (tmp_path / "labels.csv",
                                              labels)):
    with open(path, "w", newline="") as f:
      w = csv.DictWriter(f, fieldnames=list(rr[0]))
      w.writeheader()
      w.writerows(rr)
  return d, tmp_path / "labels.csv"


def test_weighted_pooling_beats_mean(tmp_path, capsys):
  d, labels = _fixture(tmp_path)
  out = tmp_path / "cal.json"
  assert cli.main(["calibrate", str(d), "--labels", str(labels), "--out",
                   str(out), "--folds", "3", "--steps", "3000", "--lr",
                   "0.05"]) == 0
  cv = json.loads(capsys.readouterr().out)
  print(cv)
  cal = calibrate.load_calibration(str(out))
  w = np.asarray(cal["pooling"]["weights"])
  assert w.shape == (6, 6)
  # The learned weights concentrate on the centre.
  assert w[2:4, 2:4].mean() > 3 * np.abs(np.delete(w.ravel(), [14, 15, 20,
                                                               21])).mean()
  assert cv["oof_auroc"] > 0.9 > cv["default_pooling_auroc"] + 0.1
  pool = calibrate.pooling_from(cal)
  m = np.load(d / "maps" / "m0.npy")
  q, _ = pool.summarise(m, np.ones_like(m))
  assert q == 1 / (1 + np.exp(-(cal["pooling"]["tau"] - np.sum(w * m))))


def test_student_assess_uses_calibration(tmp_path):
  enc = vit.VisionTransformer(patch_size=16, hidden_size=16, depth=1,
                              num_heads=2, mlp_hidden=32, num_registers=4,
                              layerscale=True, qkv_bias="qv", pos="rope",
                              rngs=nnx.Rngs(0))
  checkpoints.save_model(tmp_path / "enc", enc)
  checkpoints.save_model(tmp_path / "ada",
                         adapters.build_adapter("linear", 16, seed=1))
  rng = np.random.default_rng(0)
  w = rng.normal(size=(14, 14))
  cal = {"format": calibrate.FORMAT, "version": 1,
         "pooling": {"kind": "weighted", "weights": w.tolist(), "tau": 0.3},
         "grading": {"good_min": 0.6, "usable_min": 0.4}}
  (tmp_path / "cal.json").write_text(json.dumps(cal))
  from efiqa_jax import synth
  Image.fromarray(synth.generate(3, 256).image).save(tmp_path / "a.png")
  out = tmp_path / "out"
  assert cli.main(["assess", str(tmp_path / "a.png"), "--out", str(out),
                   "--model", "student", "--encoder", str(tmp_path / "enc"),
                   "--adapter", str(tmp_path / "ada"), "--calibration",
                   str(tmp_path / "cal.json"), "--quiet"]) == 0
  row = next(csv.DictReader(open(out / "scores.csv")))
  m = np.load(out / "maps" / "a.npy")
  want = 1 / (1 + np.exp(-(0.3 - np.sum(w * m))))
  assert abs(float(row["quality"]) - want) < 1e-5
  assert row["grade"] == ("good" if want >= 0.6 else
                          "usable" if want >= 0.4 else "reject")
  # A calibration for another grid is refused.
  cal["pooling"]["weights"] = np.zeros((4, 4)).tolist()
  (tmp_path / "cal2.json").write_text(json.dumps(cal))
  assert cli.main(["assess", str(tmp_path / "a.png"), "--out",
                   str(tmp_path / "o2"), "--model", "student", "--encoder",
                   str(tmp_path / "enc"), "--adapter", str(tmp_path / "ada"),
                   "--calibration", str(tmp_path / "cal2.json"),
                   "--quiet"]) == 2


def test_student_assess_grades_with_eyeq_head(tmp_path):
  import jax.numpy as jnp
  from efiqa_jax import fundus
  from efiqa_jax.encoders import preprocess as pp
  from efiqa_jax.student import eyeq_head
  enc = vit.VisionTransformer(patch_size=16, hidden_size=16, depth=1,
                              num_heads=2, mlp_hidden=32, num_registers=4,
                              layerscale=True, qkv_bias="qv", pos="rope",
                              rngs=nnx.Rngs(0))
  checkpoints.save_model(tmp_path / "enc", enc)
  checkpoints.save_model(tmp_path / "ada",
                         adapters.build_adapter("linear", 16, seed=1))
  from efiqa_jax import synth
  paths = []
  for s in range(3):
    paths.append(str(tmp_path / f"a{s}.png"))
    Image.fromarray(synth.generate(s, 200).image).save(paths[-1])
  feats = []
  for p in paths:
    prep = fundus.prepare_fundus(p, 512)
    x = pp.preprocess(prep.image, 224, "efiqa")[None]
    feats.append(np.asarray(enc.patch_features(jnp.asarray(x)))[0])
  feats = np.stack(feats)
  # A head whose argmax differs between images: fit it to labels 0, 1, 2.
  head, _ = eyeq_head.fit_eyeq_head(feats, np.array([0, 1, 2]),
                                    np.zeros(feats.shape[:3]), epochs=300,
                                    batch=3, lr=0.1, lam=0.0)
  il, _ = head(jnp.asarray(feats))
  want = [("good", "usable", "reject")[i] for i in np.argmax(np.asarray(il),
                                                              1)]
  hd = tmp_path / "head"
  checkpoints.save_model(hd, head)
  (hd / "calibration.json").write_text(json.dumps(
      {"format": calibrate.FORMAT, "version": 1, "eyeq_head": "."}))
  out = tmp_path / "out"
  assert cli.main(["assess", *paths, "--out", str(out), "--model", "student",
                   "--encoder", str(tmp_path / "enc"), "--adapter",
                   str(tmp_path / "ada"), "--calibration",
                   str(hd / "calibration.json"), "--quiet"]) == 0
  rows = list(csv.DictReader(open(out / "scores.csv")))
  assert [r["grade"] for r in rows] == want
  assert len(set(want)) > 1


def test_calibrate_refuses_a_teacher_run(tmp_path, capsys):
  """`assess --calibration` takes only the student; calibrating a teacher
  run must be refused up front, not written and then refused by assess."""
  d, labels = _fixture(tmp_path, n=12)
  rows = list(csv.DictReader(open(d / "scores.csv")))
  with open(d / "scores.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=["id", "status", "model"])
    w.writeheader()
    w.writerows(dict(r, model="default") for r in rows)
  out = tmp_path / "cal.json"
  assert cli.main(["calibrate", str(d), "--labels", str(labels), "--out",
                   str(out), "--steps", "10"]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1, err
  assert "assessed with model 'default', not the student" in err
  assert "calibrate-teacher" in err and not out.exists()
