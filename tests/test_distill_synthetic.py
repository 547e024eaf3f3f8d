"""experiments/distill_synthetic.py: the evaluation protocol on known maps,
every stage end to end at tiny sizes, and a fixed-seed regression run of
the distillation whose held-out AUROC has a floor.

The README's headline (student 0.826) needs a GPU-trained teacher and 1000
photographs; what CI can run is the same pipeline small enough for a minute
on 2 cores (test_distillation_regression)."""
import json
import os

import numpy as np
from PIL import Image
import pytest
from flax import nnx

from efiqa_jax import checkpoints
from efiqa_jax import synth
from efiqa_jax.models import unet
from experiments import distill_synthetic as ds


def test_eval_protocol_perfect_and_inverted_maps():
  held = ds.heldout_set(3, 4, 1, 96, ("blur", "haze"), work_size=96)
  truth = ds.eval_truth(held, 32)
  assert any(t.any() for t, _ in truth[1:5]) and any(t.any() for t, _ in
                                                      truth[5:])
  good = [t.astype(np.float32) for t, _ in truth]
  r = ds.map_aurocs(good, held, truth, 32)
  assert r["all"] == pytest.approx(1.0)
  bad = [1.0 - g for g in good]
  assert ds.map_aurocs(bad, held, truth, 32)["all"] == pytest.approx(0.0)
  assert set(r["per_kind"]) == {"blur", "haze"}


@pytest.mark.slow
def test_experiment_end_to_end_tiny(tmp_path):
  """Every stage and every column (MIM pretraining, oracle probe, teacher
  maps, figure) with an untrained teacher: plumbing, not numbers."""
  teacher = tmp_path / "teacher"
  checkpoints.save_model(teacher, unet.UNet(base_channels=4,
                                            rngs=nnx.Rngs(0)),
                         {"image_size": 64})
  st = ds.Settings(
      seed=1, n_train=6, per_kind=1, n_clean=1, size=96, work_size=96,
      eval_size=32, teacher=str(teacher),
      encoder_config="configs/encoder_mim.py:tiny",
      adapter_config="configs/adapter_synth.py:tiny",
      adapter_overrides=("config.size=64", "config.work_size=96",
                         "config.batch_size=32"),
      random_baseline=False, figure_rows=2, pretrain=True)
  out = tmp_path / "out"
  r = ds.run_experiment(str(out), st)
  assert (out / "figure.png").stat().st_size > 0
  # (the random-encoder baseline is the same code path with another
  # encoder directory; left out here to keep the test short)
  assert set(r["map_auroc"]) == {
      "teacher", "teacher + EFIQA map filter", "teacher pseudo-labels (4x4)",
      "student (mim encoder)", "oracle probe (mim encoder)",
      "student raw sigmoid (mim encoder)",
      "oracle probe raw sigmoid (mim encoder)"}
  assert all(set(v["per_kind"]) == set(synth.KINDS)
             for v in r["map_auroc"].values())
  # The pseudo-label rule distill used is recorded (this teacher has no
  # calibration: the reference's) and so is the teacher.
  assert r["pseudo_label_rule"] == {"threshold": 0.02, "relax": 0.9,
                                    "grid": 4, "mode": "hard"}
  assert r["teacher"]["path"] == str(teacher)
  assert r["n_heldout"] == 1 + len(synth.KINDS)
  # The student was distilled by the CLI from pseudo-labels on a 4x4 grid,
  # and the share reported is that of the label files it was trained on.
  data = json.load(open(out / "distill_mim" / "train" / "data.json"))
  assert data["matched"] == 6 and data["label_grid"] == [4, 4]
  labels = [np.asarray(Image.open(p)) for p in sorted(
      (out / "distill_mim" / "pseudo" / "labels").glob("*.png"))]
  assert len(labels) == 6 and all(a.shape == (4, 4) for a in labels)
  assert r["pseudo_label_positive_share"] == pytest.approx(
      np.mean([a > 0 for a in labels]))
  assert json.load(open(out / "result.json"))["map_auroc"].keys() == (
      r["map_auroc"].keys())
  md = open(out / "result.md").read()
  assert "anatomy-hiding kinds + clean" in md and "| total |" in md
  assert "pretraining loss" in md and (out / "encoder_mim").is_dir()
  student = r["map_auroc"]["student (mim encoder)"]["anatomy"]
  assert f" {student:.3f} " in md


# The regression setting: the bundled label-free teacher's pseudo-labels on
# 48 synthetic photographs (256 px) with blur, haze or overexposure, a
# randomly initialised ViT (D 64, one block, 16-px patches: 16x16 tokens), an
# MLP adapter (hidden 64, 10 epochs); 22 held-out photographs (6 per kind +
# 4 clean) scored on a 32x32 grid. About 40-55 s of CPU.
REGRESSION_KINDS = ("blur", "haze", "overexposure")


def regression_settings(seed: int) -> ds.Settings:
  return ds.Settings(
      seed=seed, n_train=48, per_kind=6, n_clean=4, size=256, work_size=256,
      eval_size=32, train_pool=REGRESSION_KINDS,
      heldout_kinds=REGRESSION_KINDS, teacher="default",
      encoder_config="configs/encoder_mim.py:tiny",
      encoder_overrides=("config.encoder.hidden_size=64",
                         "config.encoder.depth=1", "config.encoder.num_heads=2",
                         "config.encoder.mlp_hidden=128",
                         "config.encoder.patch_size=16"),
      adapter_config="configs/adapter_synth.py:tiny",
      adapter_overrides=("config.size=256", "config.work_size=256",
                         "config.batch_size=256", "config.epochs=10",
                         "config.adapter.kwargs.hidden=64",
                         "config.checkpoint_every=1000",
                         "config.log_every=1000"),
      random_baseline=False, pretrain=False, oracle_probe=False,
      teacher_maps=False, figure_rows=0)


@pytest.mark.slow
def test_distillation_regression(tmp_path):
  """Teacher pseudo-labels -> encoder features -> adapter -> held-out maps,
  fixed seed. Measured (8 fake CPU devices, as here) for seeds 0-5: student
  map 0.775 0.833 0.761 0.883 0.828 0.838, its raw sigmoid 0.670 0.737
  0.652 0.742 0.717 0.716, the map filter's gain 0.096-0.142. The floors sit
  below every seed; a student that learns nothing scores about 0.5, one
  trained on misplaced labels below that."""
  r = ds.run_experiment(str(tmp_path / "out"), regression_settings(0))
  auroc = r["map_auroc"]
  assert set(auroc) == {"student (random encoder)",
                        "student raw sigmoid (random encoder)"}
  student = auroc["student (random encoder)"]["anatomy"]
  raw = auroc["student raw sigmoid (random encoder)"]["anatomy"]
  assert student >= 0.70, auroc
  assert raw >= 0.60, auroc
  # EFIQA's map filter (what `efiqa assess` writes) helps, as in the README.
  assert student - raw >= 0.05, auroc
  assert r["n_heldout"] == 4 + 6 * len(REGRESSION_KINDS)
  assert not (tmp_path / "out" / "encoder_mim").exists()
