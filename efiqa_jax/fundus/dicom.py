"""DICOM fundus photographs through pydicom (the optional `dicom` extra)."""
from __future__ import annotations

import io
from typing import Any

import numpy as np

from efiqa_jax.fundus import io as fio

# Shared with the Pillow path in io.py (same statuses and messages).
_fail = fio._fail  # pylint: disable=protected-access
_too_large = fio._too_large  # pylint: disable=protected-access
_scale_to_uint8 = fio._scale_to_uint8  # pylint: disable=protected-access


def decode_dicom(data: bytes, meta: dict[str, Any],
                 max_pixels: int | None) -> fio.Decoded:
  """Decodes the first frame of a DICOM file to (H, W, 3) uint8 RGB."""
  meta["format"] = "DICOM"
  try:
    import pydicom  # pylint: disable=g-import-not-at-top
    import pydicom.pixels  # pylint: disable=g-import-not-at-top
  except ImportError:
    return _fail(
        fio.UNSUPPORTED, "DICOM input needs pydicom: pip install "
        "'efiqa-jax[dicom]'", meta)
  try:
    ds = pydicom.dcmread(io.BytesIO(data), force=True)
  except Exception as e:  # pylint: disable=broad-except
    return _fail(fio.UNREADABLE,
                 f"cannot parse DICOM: {type(e).__name__}: {e}", meta)
  if "PixelData" not in ds:
    return _fail(fio.UNSUPPORTED,
                 "DICOM file has no pixel data", meta)
  rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
  photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
  bits_stored = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)))
  frames = int(ds.get("NumberOfFrames", 1) or 1)
  meta.update(width=cols, height=rows, mode=photometric, n_frames=frames,
              bit_depth=bits_stored)
  msg = _too_large(cols, rows, max_pixels)
  if msg:
    return _fail(fio.TOO_LARGE, msg, meta)
  syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
  msg = _missing_decoder(syntax)
  if msg:
    return _fail(fio.UNSUPPORTED, msg, meta)
  try:
    # index=0: decode only the first frame; YBR_* arrives as RGB (pydicom 3).
    ds.pixel_array_options(index=0)
    a = np.asarray(ds.pixel_array)
  except Exception as e:  # pylint: disable=broad-except
    detail = " ".join(str(e).split())  # one status line
    return _fail(fio.UNSUPPORTED,
                 f"cannot decode DICOM pixel data (transfer syntax "
                     f"{syntax or 'unknown'}): {type(e).__name__}: {detail}",
                 meta)
  if photometric == "PALETTE COLOR":
    a = pydicom.pixels.apply_color_lut(a, ds)
    bits_stored = 16 if a.dtype != np.uint8 else 8
  if a.ndim == 2:
    g = _scale(a, bits_stored)
    if photometric == "MONOCHROME1":  # 0 is white
      g = 255 - g
    rgb = np.repeat(g[..., None], 3, axis=-1)
  elif a.ndim == 3 and a.shape[-1] in (3, 4):
    rgb = _scale(a[..., :3], bits_stored)
  else:
    return _fail(fio.UNSUPPORTED,
                 f"unexpected DICOM pixel array shape {a.shape} "
                     f"({photometric})", meta)
  rgb = np.ascontiguousarray(rgb)
  meta["height"], meta["width"] = rgb.shape[:2]
  return fio.Decoded(rgb, fio.OK, "", meta)


def _missing_decoder(syntax) -> str:
  """'' if pydicom can decode `syntax` here, else one line naming what to
  install. Compressed pixel data needs a decoder plugin: the `dicom` extra
  (pydicom + Pillow) covers RLE, JPEG baseline and JPEG 2000; JPEG Lossless,
  JPEG-LS and HTJ2K need python-gdcm or pylibjpeg."""
  if syntax is None:
    return ""
  from pydicom.pixels import get_decoder  # pylint: disable=g-import-not-at-top
  try:
    dec = get_decoder(syntax)
  except NotImplementedError:
    return (f"DICOM transfer syntax {syntax} "
            f"({getattr(syntax, 'name', syntax)}) has no pixel data decoder "
            "in pydicom")
  except Exception:  # pylint: disable=broad-except
    return ""  # not a known UID: let the decode attempt report
  if dec.is_available:
    return ""
  # pydicom lists 'gdcm - requires gdcm>=3.0.10', ...; gdcm's pip package
  # is python-gdcm.
  needs = [d.split(" - requires ", 1)[-1] for d in dec.missing_dependencies]
  needs = ["python-" + n if n.startswith("gdcm") else n for n in needs]
  return (f"DICOM pixel data in {syntax.name} ({syntax}) needs a decoder "
          "that is not installed: pip install one of: " + " | ".join(needs))


def _scale(a: np.ndarray, bits: int) -> np.ndarray:
  if a.dtype == np.uint8 and bits <= 8:
    return a
  if np.issubdtype(a.dtype, np.signedinteger):
    a = a - a.min() if a.size and a.min() < 0 else a
  bits = max(1, min(int(bits), 16 if a.dtype.itemsize <= 2 else 32))
  return _scale_to_uint8(a, bits)
