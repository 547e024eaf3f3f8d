"""Fundus photograph I/O and field-of-view preprocessing.

decode_image: any image file / bytes (or DICOM with the `dicom` extra) ->
  (H, W, 3) uint8 RGB, with header-first decompression-bomb refusal.
detect_fov: the FOV circle, also when the frame cuts it (or a full-frame
  fallback with circular=False).
check_fundus: the fundus gate (is it a colour fundus photograph, and if
  not, why).
prepare_fundus: decode + FOV + gate + square crop at a working size, never
  raises.
map_to_original / map_to_crop: move maps between the crop and the original.
"""
from efiqa_jax.fundus.fov import FOV
from efiqa_jax.fundus.fov import detect_fov
from efiqa_jax.fundus.fov import fit_circle
from efiqa_jax.fundus.fov import robust_fit_circle
from efiqa_jax.fundus.gate import NOT_FUNDUS
from efiqa_jax.fundus.gate import GateResult
from efiqa_jax.fundus.gate import check as check_fundus
from efiqa_jax.fundus.io import DEFAULT_MAX_PIXELS
from efiqa_jax.fundus.io import Decoded
from efiqa_jax.fundus.io import decode_image
from efiqa_jax.fundus.prepare import Prepared
from efiqa_jax.fundus.prepare import crop_box
from efiqa_jax.fundus.prepare import map_to_crop
from efiqa_jax.fundus.prepare import map_to_original
from efiqa_jax.fundus.prepare import prepare_fundus
from efiqa_jax.fundus.prepare import prepare_image

__all__ = [
    "DEFAULT_MAX_PIXELS", "Decoded", "FOV", "GateResult", "NOT_FUNDUS",
    "Prepared", "check_fundus", "crop_box",
    "decode_image", "detect_fov", "fit_circle", "map_to_crop",
    "map_to_original", "prepare_fundus", "prepare_image",
    "robust_fit_circle",
]
