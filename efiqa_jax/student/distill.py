"""`efiqa distill`: teacher pseudo-labels -> feature extraction -> adapter.

One command for EFIQA's stages 1 -> 2 on a folder of photographs:
  WORKDIR/pseudo/    `efiqa pseudo-label --from-photos` (teacher anomaly on
                     the label-free vessel map of the 512 FOV crop), on the
                     adapter's output grid (14x14 for the linear adapter at
                     224 with /16 patches; 16x16 for EFIQA-CP at 1024);
  WORKDIR/features/  `efiqa extract` (same FOV crop, EFIQA preprocessing);
  WORKDIR/train/     `efiqa train-adapter` from those two (resumable), the
                     final adapter in WORKDIR/train/adapter.
Re-running the command resumes every stage (pseudo-labels and features
already on disk are kept; training restarts from its checkpoint).
"""
from __future__ import annotations

import os
import sys
from typing import Sequence


def label_grid(config, encoder: str) -> tuple[int, int]:
  """The adapter's output grid for the config's encoder input size."""
  from flax import nnx
  from efiqa_jax import checkpoints
  from efiqa_jax.models import adapters
  meta = checkpoints.check_kind(encoder, "encoder")
  if meta["architecture"] != "vit":
    raise ValueError(f"{encoder} is not a ViT encoder")
  p = int(meta["kwargs"]["patch_size"])
  d = int(meta["kwargs"]["hidden_size"])
  if config.size % p:
    raise ValueError(f"size {config.size} is not a multiple of {p}")
  g = config.size // p
  ada = nnx.eval_shape(lambda: adapters.build_adapter(
      config.adapter.name, d, **dict(config.adapter.kwargs)))
  return ada.output_grid(g, g)


def distill(inputs: Sequence[str], teacher: str, encoder: str, workdir: str,
            config, *, batch_size: int = 8, progress: bool = True):
  """Runs the three stages; returns train.TrainResult."""
  from efiqa_jax import features
  from efiqa_jax import pseudo_labels
  from efiqa_jax.student import train

  from efiqa_jax import sources
  sources.list_inputs(list(inputs))  # no image: NoInputsError before any work
  workdir = os.path.abspath(workdir)
  oh, ow = label_grid(config, encoder)
  if oh != ow:
    raise ValueError(f"non-square label grid {oh}x{ow}")
  pdir = os.path.join(workdir, "pseudo")
  pl = config.get("pseudo_labels", {})
  spec, origin = pseudo_labels.teacher_label_spec(
      teacher, oh, threshold=pl.get("threshold"), relax=pl.get("relax"))
  if progress:
    print(f"distill: pseudo-labels |f(x)| > {spec.threshold:g} on "
          f">= {spec.relax:g} of a cell ({origin})", file=sys.stderr)
  # Resumes: photographs already labelled (same rule) are skipped.
  res = pseudo_labels.write_pseudo_labels(
      list(inputs), teacher, pdir, from_photos=True, spec=spec,
      batch_size=batch_size, work_size=config.work_size, progress=progress)
  if res["failed"]:
    print(f"distill: {res['failed']} of {res['total']} photographs got no "
          f"pseudo-label (see {pdir}/manifest.csv)", file=sys.stderr)
  fdir = os.path.join(workdir, "features")
  features.extract_features(list(inputs), encoder, fdir, size=config.size,
                            work_size=config.work_size, batch_size=batch_size,
                            progress=progress)
  with config.unlocked():
    config.mode = "features"
    config.features_dir = fdir
    config.labels_dir = pdir
    config.progress = progress and config.progress
  return train.train_and_evaluate(config, os.path.join(workdir, "train"))
