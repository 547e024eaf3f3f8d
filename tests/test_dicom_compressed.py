"""Compressed DICOM (encapsulated pixel data), the kind ophthalmic cameras
write: JPEG baseline (1.2.840.10008.1.2.4.50) and JPEG 2000 decode with the
`dicom` extra (pydicom + Pillow); a compression no installed decoder reads
is `unsupported` with one line naming what to install."""
import io

import numpy as np
import pytest
from PIL import Image

from efiqa_jax import fundus
from efiqa_jax import synth

pydicom = pytest.importorskip("pydicom")
from pydicom import uid  # noqa: E402  pylint: disable=g-import-not-at-top

IMG = synth.generate(3, 192).image  # a synthetic fundus photograph


def _encoded(img, fmt, **kw):
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, fmt, **kw)
  return buf.getvalue()


def _dicom(frames, syntax, photometric, shape):
  """A secondary-capture-like DICOM with `frames` (encoded bytes) in
  encapsulated pixel data, as a camera writes it."""
  from pydicom.dataset import FileDataset, FileMetaDataset
  from pydicom.encaps import encapsulate
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.5.1"
  meta.MediaStorageSOPInstanceUID = uid.generate_uid()
  meta.TransferSyntaxUID = syntax
  ds = FileDataset("x.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
  ds.Rows, ds.Columns = shape[:2]
  ds.PhotometricInterpretation = photometric
  ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
  ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
  ds.PixelRepresentation = 0
  if len(frames) > 1:
    ds.NumberOfFrames = len(frames)
  ds.PixelData = encapsulate(frames)
  ds["PixelData"].is_undefined_length = True
  b = io.BytesIO()
  pydicom.dcmwrite(b, ds, enforce_file_format=True)
  return b.getvalue()


@pytest.mark.parametrize("subsampling,photometric", [
    (2, "YBR_FULL_422"),  # 4:2:0, what cameras and Pillow write by default
    (0, "YBR_FULL")])     # 4:4:4
def test_jpeg_baseline(subsampling, photometric):
  jpg = _encoded(IMG, "JPEG", quality=95, subsampling=subsampling)
  other = _encoded(255 - IMG, "JPEG", quality=95, subsampling=subsampling)
  data = _dicom([jpg, other], uid.JPEGBaseline8Bit, photometric, IMG.shape)
  dec = fundus.decode_image(data)
  assert dec.ok, dec.message
  assert dec.meta["format"] == "DICOM" and dec.meta["n_frames"] == 2
  # The first frame, as Pillow decodes the same JPEG stream (the YCbCr ->
  # RGB rounding may differ by 1) ...
  want = np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB")).astype(int)
  got = dec.image.astype(int)
  assert got.shape == IMG.shape and np.abs(got - want).max() <= 1
  # ... and the photograph within JPEG's loss at quality 95 (measured mean
  # |diff| 1.0-1.3 grey levels).
  assert np.abs(got - IMG.astype(int)).mean() < 2.0
  res = fundus.prepare_fundus(data, size=64)
  assert res.ok and res.circular


@pytest.mark.parametrize("syntax,kw,photometric,mean_tol", [
    (uid.JPEG2000Lossless, dict(irreversible=False), "RGB", 0.0),
    (uid.JPEG2000, dict(irreversible=True, quality_mode="dB",
                        quality_layers=[45]), "YBR_ICT", 1.5)])
def test_jpeg2000(syntax, kw, photometric, mean_tol):
  j2k = _encoded(IMG, "JPEG2000", no_jp2=True, mct=1, **kw)
  dec = fundus.decode_image(_dicom([j2k], syntax, photometric, IMG.shape))
  assert dec.ok, dec.message
  # Lossless: bit for bit; lossy at 45 dB: measured mean |diff| 0.75.
  assert np.abs(dec.image.astype(int) - IMG).mean() <= mean_tol


def test_compression_without_a_decoder_is_unsupported():
  from pydicom.pixels import get_decoder
  if get_decoder(uid.JPEGLosslessSV1).is_available:
    pytest.skip("a JPEG Lossless decoder (gdcm or pylibjpeg) is installed")
  # (the bytes are never read: no installed plugin accepts the syntax)
  data = _dicom([_encoded(IMG, "JPEG")], uid.JPEGLosslessSV1, "RGB",
                IMG.shape)
  for dec in (fundus.decode_image(data), fundus.prepare_fundus(data)):
    assert dec.status == "unsupported"
    assert "\n" not in dec.message
    assert "1.2.840.10008.1.2.4.70" in dec.message
    assert "python-gdcm" in dec.message and "pylibjpeg-libjpeg" in (
        dec.message)
