"""Synthetic fundus photographs with vessel ground truth and quality degradations.

  generate(seed, size=512, *, degrade=None, lesions=None, ...) -> SynthSample
  degrade(image, fov_mask, seed_or_rng, *, kinds=None, severity=None)
      -> (image uint8, mask float32 in [0, 1], info dict)   # real photos too
  write_dataset(out_dir, n, seed, size=512, **opts) -> path of labels.csv
"""
from efiqa_jax.synth.dataset import write_dataset
from efiqa_jax.synth.degradations import KINDS, degrade, grade
from efiqa_jax.synth.generator import (LESION_KINDS, SynthSample, generate)

__all__ = ["KINDS", "LESION_KINDS", "SynthSample", "degrade", "generate", "grade",
           "write_dataset"]
