"""Synthetic fundus photographs with vessel ground truth and quality degradations.

  generate(seed, size=512, *, degrade=None, lesions=None, ...) -> SynthSample
      image (S,S,3) uint8, vessels (S,S) uint8 0/1, degradation (S,S) float32
      in [0,1], fov_mask (S,S) bool, labels dict, plus clean_image,
      lesion_mask, info (degrade() info) and geometry (FOV, disc, fovea).
  degrade(image, fov_mask, seed_or_rng, *, kinds=None, severity=None, pool=None)
      -> (image uint8, mask float32 in [0, 1], info dict)   # real photos too
  write_dataset(out_dir, n, seed, size=512, **opts) -> path of labels.csv

Anatomy (`anatomy.py`, `generator.py`): 45-degree colour fundus, left or right
eye, circular FOV on black (20% of frames crop it at top and bottom), disc with
cup, macula with a vessel-free fovea, arteries and veins grown from the disc
(temporal arcades around the macula, nasal vessels, tapering branches),
choroidal texture, vignetting, fair to dark pigmentation. Lesions (exudates,
haemorrhages, drusen) are pathology, not degradation: they never enter the
degradation mask and are painted under the vessels, so the vessel ground
truth is the same with and without them.

Degradation masks (`degradations.py` has the per-kind table): the mask is the
local severity, severity x spatial profile of the kind: a global kind at
severity s gives s over the whole FOV, a local kind gives s inside its region
(shadow, glare, lashes, dust, dark side of uneven illumination, local blur)
fading to 0 outside. Kinds combine as 1 - prod(1 - m_k). 0 outside the FOV.

Labels: degradations (';'-joined kinds in application order, empty = clean),
severities (per kind, same order), severity (max), degraded_fraction (share of
FOV pixels with mask > 0.5), mean_degradation (mean mask over the FOV), grade:
reject if degraded_fraction >= 0.25; usable if degraded_fraction >= 0.05 or
mean_degradation >= 0.15; else good. lesions (';'-joined, empty = none).
"""
from efiqa_jax.synth.dataset import LABEL_COLUMNS, image_seed, write_dataset
from efiqa_jax.synth.degradations import KINDS, VESSEL_HIDING, degrade, grade
from efiqa_jax.synth.generator import LESION_KINDS, SynthSample, generate

__all__ = ["KINDS", "LABEL_COLUMNS", "LESION_KINDS", "SynthSample",
           "VESSEL_HIDING", "degrade", "generate", "grade", "image_seed",
           "write_dataset"]
