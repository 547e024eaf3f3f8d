"""Student-side check on synthetic photographs with ORACLE pseudo-labels.

No trained teacher is available in this branch, so the synthetic generator's
degradation masks stand in for the teacher's pseudo-labels: this measures
what the student half (FOV crop -> encoder -> linear adapter -> sigmoid map)
can learn, not EFIQA's label-free distillation. Encoder: a randomly
initialised tiny DINOv3-like ViT (no pretrained weights can be downloaded).

  PYTHONPATH=$PWD python experiments/student_synth.py [--train 48 --test 16]

Prints the held-out map AUROC against the synthetic degradation cells.
"""
import argparse
import os
import tempfile

import numpy as np
from PIL import Image


def cell_truth(sample, prep, grid):
  """Synthetic degradation mask in the crop frame -> (grid, grid) share."""
  from efiqa_jax import quality as q
  deg = sample.degradation
  side, x0, y0 = prep.crop_size, prep.crop_x0, prep.crop_y0
  canvas = np.zeros((side, side), np.float32)
  h, w = deg.shape
  ys, xs = max(0, y0), max(0, x0)
  ye, xe = min(h, y0 + side), min(w, x0 + side)
  canvas[ys - y0:ye - y0, xs - x0:xe - x0] = deg[ys:ye, xs:xe]
  return q.fov_at(canvas, (grid, grid))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--train", type=int, default=48)
  ap.add_argument("--test", type=int, default=16)
  ap.add_argument("--size", type=int, default=224)
  ap.add_argument("--epochs", type=int, default=30)
  ap.add_argument("--adapter", default="linear")
  ap.add_argument("--lr", type=float, default=1e-3)
  a = ap.parse_args()
  from flax import nnx
  from efiqa_jax import checkpoints, config_util, fundus, metrics, synth
  from efiqa_jax import quality_model
  from efiqa_jax.encoders import extract
  from efiqa_jax import quality as q
  from efiqa_jax.models import vit
  from efiqa_jax.student import train

  tmp = tempfile.mkdtemp()
  enc = os.path.join(tmp, "enc")
  checkpoints.save_model(enc, vit.VisionTransformer(
      patch_size=16, hidden_size=64, depth=2, num_heads=4, mlp_hidden=128,
      num_registers=4, layerscale=True, qkv_bias="qv", pos="rope",
      rngs=nnx.Rngs(0)))
  grid = a.size // 16
  split = {"train": range(a.train), "test": range(1000, 1000 + a.test)}
  paths, truth = {}, {}
  os.makedirs(os.path.join(tmp, "pl", "labels"))
  for part, seeds in split.items():
    paths[part] = []
    for s in seeds:
      smp = synth.generate(s, 512, degrade=True)
      p = os.path.join(tmp, f"{part}_{s}.png")
      Image.fromarray(smp.image).save(p)
      prep = fundus.prepare_fundus(p, 512)
      t = cell_truth(smp, prep, grid)
      truth[p] = (t, q.fov_at(prep.fov_mask, (grid, grid)))
      paths[part].append(p)
      if part == "train":
        Image.fromarray(((t > 0.5) * 255).astype(np.uint8)).save(
            os.path.join(tmp, "pl", "labels", f"train_{s}.png"))
  extract.extract_features(paths["train"], enc, os.path.join(tmp, "f"),
                           size=a.size, batch_size=16)
  pos = np.mean([truth[p][0] > 0.5 for p in paths["train"]])
  cfg = config_util.load_config("configs/adapter.py")
  cfg.features_dir, cfg.labels_dir = os.path.join(tmp, "f"), os.path.join(
      tmp, "pl")
  cfg.batch_size, cfg.epochs, cfg.progress = 256, a.epochs, False
  cfg.loss.pos_weight = float((1 - pos) / max(pos, 1e-3))
  cfg.adapter.name, cfg.optimizer.lr = a.adapter, a.lr
  res = train.train_and_evaluate(cfg, os.path.join(tmp, "wd"))
  sq = quality_model.StudentQualityModel.from_checkpoints(enc, res.adapter_dir)
  ys, ss, ws = [], [], []
  for p in paths["test"]:
    prep = fundus.prepare_fundus(p, 512)
    m = sq.predict(prep.image[None], prep.fov_mask[None])[0]
    t, w = truth[p]
    ys.append(t.ravel() > 0.5)
    ss.append(m.ravel())
    ws.append(w.ravel())
  ys, ss, ws = map(np.concatenate, (ys, ss, ws))
  print(f"train positives {pos:.3f}; final loss {res.final_loss:.4f}; "
        f"held-out map AUROC vs synthetic degradation cells (FOV-weighted): "
        f"{metrics.auroc(ys, ss, ws):.3f} on {a.test} images")


if __name__ == "__main__":
  main()
