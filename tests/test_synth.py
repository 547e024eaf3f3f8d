"""Synthetic fundus generator: determinism, geometry, masks, labels, real photos."""
import csv
import hashlib
import pathlib

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi

from efiqa_jax import cli
from efiqa_jax.synth import KINDS, degrade, generate, grade, write_dataset
from efiqa_jax.synth import degradations

SIZE = 256   # small frames keep the suite fast; the CLI test uses the default 512
LOCAL = ("illumination", "shadow", "glare", "eyelash", "dust")


def _hashes(root: pathlib.Path):
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


def test_generate_is_deterministic():
  a, b = generate(7, SIZE), generate(7, SIZE)
  for f in ("image", "vessels", "degradation", "fov_mask", "clean_image"):
    np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
  assert a.labels == b.labels
  c = generate(8, SIZE)
  assert not np.array_equal(a.image, c.image)


def test_stages_use_separate_streams():
  # Degradation and lesions never change the anatomy of a seed.
  d = generate(3, SIZE, degrade=True, lesions=False)
  c = generate(3, SIZE, degrade=False, lesions=False)
  np.testing.assert_array_equal(d.clean_image, c.image)
  np.testing.assert_array_equal(d.vessels, c.vessels)
  l = generate(3, SIZE, degrade=False, lesions=True)
  np.testing.assert_array_equal(l.vessels, c.vessels)   # lesions lie under vessels


@pytest.mark.parametrize("seed", [0, 1, 2, 5])
def test_shapes_ranges_fov(seed):
  s = generate(seed, SIZE)
  assert s.image.shape == (SIZE, SIZE, 3) and s.image.dtype == np.uint8
  assert s.vessels.shape == (SIZE, SIZE) and s.vessels.dtype == np.uint8
  assert set(np.unique(s.vessels)) <= {0, 1}
  assert s.degradation.dtype == np.float32
  assert 0.0 <= s.degradation.min() and s.degradation.max() <= 1.0
  assert s.fov_mask.dtype == bool
  # FOV is the disc of the stored geometry (clipped by the frame).
  g = s.geometry
  yy, xx = np.mgrid[0:SIZE, 0:SIZE]
  disc = (xx - g.cx) ** 2 + (yy - g.cy) ** 2 <= g.r ** 2
  np.testing.assert_array_equal(s.fov_mask, disc)
  # Black outside the FOV (JPEG may ring by a few levels there).
  out = s.image[~s.fov_mask]
  lim = 12 if "jpeg" in s.labels["degradations"] else 0
  assert out.max() <= lim
  assert s.clean_image[~s.fov_mask].max() == 0
  assert s.image[s.fov_mask].mean() > 20
  # Masks are zero outside the FOV.
  assert not s.vessels[~s.fov_mask].any()
  assert not s.degradation[~s.fov_mask].any()


@pytest.mark.parametrize("seed", [0, 4, 9])
def test_vessels_nontrivial_and_rooted_at_disc(seed):
  s = generate(seed, SIZE, degrade=False, lesions=False)
  g = s.geometry
  frac = s.vessels[s.fov_mask].mean()
  assert 0.04 < frac < 0.25, frac
  lab, _ = ndi.label(s.vessels, structure=np.ones((3, 3)))
  yy, xx = np.mgrid[0:SIZE, 0:SIZE]
  in_disc = ((xx - g.disc_x) / g.disc_rx) ** 2 + ((yy - g.disc_y) / g.disc_ry) ** 2 <= 1
  rooted = np.setdiff1d(np.unique(lab[in_disc & (lab > 0)]), [0])
  assert rooted.size >= 1
  share = np.isin(lab, rooted).sum() / s.vessels.sum()
  # Branches leave and re-enter the circular FOV only rarely.
  assert share > 0.9, share
  # Thin vessels rasterise without gaps: no tiny fragments away from the rim.
  sizes = np.bincount(lab.ravel())
  rim = ndi.binary_dilation(~s.fov_mask, iterations=3)
  for i in np.flatnonzero(sizes[1:] < 5) + 1:
    assert rim[lab == i].any(), f"fragment of {sizes[i]} px inside the FOV"
  # The fovea is vessel-free.
  near_fovea = (xx - g.fovea_x) ** 2 + (yy - g.fovea_y) ** 2 <= (0.05 * g.r) ** 2
  assert not s.vessels[near_fovea].any()
  # Vessels are darker than their surroundings in green.
  green = s.image[..., 1].astype(float)
  ring = ndi.binary_dilation(s.vessels > 0, iterations=3) & ~(s.vessels > 0) & s.fov_mask
  assert green[(s.vessels > 0) & s.fov_mask].mean() < green[ring].mean() - 3


def test_clean_and_degraded_masks():
  c = generate(11, SIZE, degrade=False)
  assert not c.degradation.any()
  assert c.labels["degradations"] == "" and c.labels["grade"] == "good"
  for seed in range(4):
    d = generate(seed, SIZE, degrade=True)
    assert d.labels["degradations"]
    assert d.degradation[d.fov_mask].max() > 0
    assert not d.degradation[~d.fov_mask].any()


@pytest.mark.parametrize("kind", LOCAL)
def test_local_kinds_change_image_where_mask(kind):
  c = generate(2, SIZE, degrade=False, lesions=False)
  img, mask, info = degrade(c.image, c.fov_mask, 5, kinds=[kind], severity=0.8)
  assert info["kinds"] == [kind] and info["extent"][kind] == "local"
  diff = np.abs(img.astype(int) - c.image.astype(int)).max(-1)
  fov = c.fov_mask
  hit, miss = fov & (mask > 0.3), fov & (mask == 0)
  assert hit.sum() > 50 and miss.sum() > 50
  assert diff[hit].mean() > 8, diff[hit].mean()
  # Outside the mask the photograph is untouched.
  assert (diff[miss] > 2).mean() < 0.01
  assert 0.4 < mask.max() <= 0.8 + 1e-6   # mask = severity x profile


def test_local_blur_and_global_kinds():
  c = generate(2, SIZE, degrade=False, lesions=False)
  rng = np.random.default_rng(0)
  found_local = False
  for _ in range(12):   # blur is local with probability 0.4
    img, mask, info = degrade(c.image, c.fov_mask, rng, kinds="blur", severity=0.9)
    if info["extent"]["blur"] == "local":
      found_local = True
      diff = np.abs(img.astype(int) - c.image.astype(int)).max(-1)
      miss = c.fov_mask & (mask == 0)
      assert (diff[miss] > 2).mean() < 0.01
      break
  assert found_local
  for kind in ("motion", "overexposure", "haze", "noise", "jpeg"):
    img, mask, info = degrade(c.image, c.fov_mask, 1, kinds=[kind], severity=0.5)
    inside = mask[c.fov_mask]
    assert inside.min() > 0.3 and inside.max() <= 0.5 + 1e-6, kind
    assert np.abs(img.astype(int) - c.image.astype(int))[c.fov_mask].mean() > 1.0, kind
  _, _, info = degrade(c.image, c.fov_mask, 1, kinds=["jpeg"], severity=0.5)
  dec = np.asarray(Image.open(__import__("io").BytesIO(info["jpeg_bytes"])).convert("RGB"))
  np.testing.assert_array_equal(dec, degrade(c.image, c.fov_mask, 1, kinds=["jpeg"],
                                             severity=0.5)[0])


def test_combined_mask_and_grade():
  c = generate(4, SIZE, degrade=False)
  _, mask, info = degrade(c.image, c.fov_mask, 0, kinds=["noise", "motion"],
                          severity={"noise": 0.5, "motion": 0.4})
  np.testing.assert_allclose(mask[c.fov_mask], 1 - 0.5 * 0.6, atol=1e-5)
  assert info["severity"] == 0.5 and info["grade"] == "reject"
  # The README's rule at its bounds: reject at >= 25 % of the FOV degraded,
  # usable at >= 5 % or a mean mask >= 0.15.
  assert grade(0.0, 0.0) == "good" and grade(0.0499, 0.1499) == "good"
  assert grade(0.05, 0.0) == "usable" and grade(0.0, 0.15) == "usable"
  assert grade(0.2499, 0.9) == "usable"
  assert grade(0.25, 0.0) == "reject" and grade(0.3, 0.1) == "reject"


def test_bad_input_errors(tmp_path):
  c = generate(1, 128, degrade=False)
  with pytest.raises(ValueError, match="unknown degradation"):
    degrade(c.image, c.fov_mask, 0, kinds=["fog"])
  with pytest.raises(ValueError, match="severity"):
    degrade(c.image, c.fov_mask, 0, kinds=["blur"], severity=1.5)
  with pytest.raises(ValueError, match="uint8"):
    degrade(c.image.astype(float), c.fov_mask, 0)
  with pytest.raises(ValueError, match="fov_mask"):
    degrade(c.image, c.fov_mask[:-1], 0)
  with pytest.raises(ValueError, match="empty"):
    degrade(c.image, np.zeros_like(c.fov_mask), 0)
  write_dataset(tmp_path / "d", 1, 0, 128)
  with pytest.raises(FileExistsError):
    write_dataset(tmp_path / "d", 1, 0, 128)


def test_cli_is_byte_identical_and_labels_consistent(tmp_path):
  args = ["synth", "--n", "16", "--seed", "0", "--quiet"]
  assert cli.main(args + ["--out", str(tmp_path / "a")]) == 0
  assert cli.main(args + ["--out", str(tmp_path / "b")]) == 0
  ha, hb = _hashes(tmp_path / "a"), _hashes(tmp_path / "b")
  assert ha == hb and len(ha) == 16 * 3 + 1
  with open(tmp_path / "a" / "labels.csv") as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0]) == ["id", "image", "seed", "eye", "degradations", "severities",
                           "severity", "degraded_fraction", "mean_degradation",
                           "grade", "lesions"]
  assert len(rows) == 16
  kinds_seen = set()
  for row in rows[:16]:
    root = tmp_path / "a"
    img = np.asarray(Image.open(root / row["image"]).convert("RGB"))
    ves = np.asarray(Image.open(root / "vessels" / f"{row['id']}.png"))
    deg = np.asarray(Image.open(root / "degradation" / f"{row['id']}.png"))
    assert img.shape == (512, 512, 3) and ves.shape == deg.shape == (512, 512)
    assert set(np.unique(ves)) <= {0, 255}
    assert row["image"].endswith(".jpg") == ("jpeg" in row["degradations"].split(";"))
    s = generate(int(row["seed"]), 512)          # rows regenerate from their seed
    np.testing.assert_array_equal(img, s.image)
    np.testing.assert_array_equal(ves > 0, s.vessels > 0)
    frac = float(np.mean(deg[s.fov_mask] / 255.0 > 0.5))
    assert abs(frac - float(row["degraded_fraction"])) < 0.01
    assert row["grade"] == grade(float(row["degraded_fraction"]),
                                 float(row["mean_degradation"]))
    if not row["degradations"]:
      assert not deg.any() and float(row["severity"]) == 0.0
    else:
      kinds_seen.update(row["degradations"].split(";"))
      assert deg.max() > 0
      sev = [float(v) for v in row["severities"].split(";")]
      assert abs(max(sev) - float(row["severity"])) < 1e-3
  assert kinds_seen <= set(KINDS) and len(kinds_seen) >= 4
  n_clean = sum(not r["degradations"] for r in rows)
  assert 1 <= n_clean <= 10   # default clean fraction 0.3


def test_cli_options(tmp_path, capsys):
  from efiqa_jax.commands import synth as synth_cmd
  assert synth_cmd.KINDS_HELP.split(",") == list(KINDS)
  out = tmp_path / "o"
  assert cli.main(["synth", "--n", "6", "--out", str(out), "--seed", "3", "--size", "128",
                   "--clean-fraction", "0", "--no-lesions", "--kinds", "blur,shadow",
                   "--quiet"]) == 0
  with open(out / "labels.csv") as f:
    rows = list(csv.DictReader(f))
  assert all(r["lesions"] == "" for r in rows)
  assert all(r["degradations"] and set(r["degradations"].split(";")) <= {"blur", "shadow"}
             for r in rows)
  with pytest.raises(SystemExit):
    cli.main(["synth", "--n", "1", "--out", str(tmp_path / "x"), "--clean-fraction", "2"])
  assert cli.main(["synth", "--n", "1", "--out", str(tmp_path / "y"), "--kinds", "fog",
                   "--quiet"]) == 2
  assert "unknown degradation" in capsys.readouterr().err
  assert not (tmp_path / "y").exists()   # validated before writing anything
  assert cli.main(["synth", "--n", "1", "--out", str(out), "--quiet"]) == 2   # exists
  assert "overwrite" in capsys.readouterr().err


def _check_real(img, fov):
  for kinds in (None, ["shadow"], ["blur", "jpeg"], ["haze", "eyelash"]):
    out, mask, info = degrade(img, fov, 0, kinds=kinds, severity=None if kinds is None
                              else 0.7)
    assert out.shape == img.shape and out.dtype == np.uint8
    assert mask.shape == fov.shape and mask.dtype == np.float32
    assert 0 <= mask.min() and mask.max() <= 1 and not mask[~fov].any()
    assert mask[fov].max() > 0
    diff = np.abs(out.astype(int) - img.astype(int)).max(-1)
    assert diff[fov & (mask > 0.3)].mean() > 2
    if "jpeg" not in info["kinds"]:
      np.testing.assert_array_equal(out[~fov], img[~fov])


def test_degrade_real_retina():
  try:
    from skimage import data
    img = data.retina()
  except Exception as e:  # no cached copy and no network
    pytest.skip(f"skimage.data.retina() unavailable: {e!r}")
  img = img[::2, ::2]   # 706 x 706: still a non-512 real photograph
  fov = img.max(-1) > 25
  fov = ndi.binary_fill_holes(ndi.binary_opening(fov, iterations=2))
  _check_real(img, fov)


def test_degrade_real_drive(fundus_dir):
  img = np.asarray(Image.open(fundus_dir / "drive" / "01_image.png").convert("RGB"))
  fov = np.asarray(Image.open(fundus_dir / "drive" / "01_fov_mask.png").convert("L")) > 127
  assert img.shape[:2] == (584, 565)
  _check_real(img, fov)
