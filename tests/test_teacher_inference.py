"""efiqa_jax.teacher.inference: the teacher sees at inference what it saw in
training, |f(x)| is computed in one place, and the map rule; the splits of
good photographs (teacher.data)."""
import os

import numpy as np
import pytest
from PIL import Image

from efiqa_jax.teacher import data as data_lib
from efiqa_jax.teacher import inference


@pytest.mark.parametrize("n_in,n_out", [(256, 128), (256, 64), (512, 128),
                                        (128, 256), (256, 200)])
def test_resize_u8_is_pils_bilinear_bit_for_bit(n_in, n_out):
  rng = np.random.default_rng(n_in + n_out)
  x = (rng.random((3, n_in, n_in)) * 255).astype(np.uint8)
  x[:, : n_in // 5] = 0  # flat black next to texture, as in a vessel map
  ref = np.stack([np.asarray(Image.fromarray(a).resize((n_out, n_out),
                                                       Image.BILINEAR))
                  for a in x])
  np.testing.assert_array_equal(np.asarray(inference.resize_u8(x, n_out)),
                                ref)


def test_teacher_input_is_the_trainers_map():
  """A photograph's teacher input at inference equals the map the trainer
  feeds (label-free map at load size, grey <= 50 cut, PIL resize), so the
  teacher is never asked about a map unlike its training maps."""
  from skimage import data as skdata
  from efiqa_jax import fundus
  from efiqa_jax.teacher import augment
  p = fundus.prepare_image(skdata.retina(), 256)
  load, t = 128, 64
  v = data_lib._label_free(p.image[None], p.fov_mask[None], load)[0]  # pylint: disable=protected-access
  m = data_lib.to_uint8_map(v, load, 50)
  out, info = augment.augment(
      m, np.random.default_rng(0), fov_p=0.0, orig_diameter=load,
      cfg=augment.AugmentConfig(out_size=t, hflip=False, vflip=False,
                                rotation=False))
  assert not info["fov_crop"]
  x = np.asarray(inference.teacher_input(p.image[None], p.fov_mask[None],
                                         teacher_size=t, load_size=load))[0]
  assert x.shape == (t, t, 3) and np.array_equal(x[..., 0], x[..., 2])
  ours = np.round(x[..., 0] * 255).astype(int)
  # Both run the same jitted segmenter; a grey value on the 50 cut-off or a
  # rounding edge may differ by float32 summation order only.
  diff = np.abs(ours - out.astype(int))
  assert (diff > 1).mean() < 1e-3 and diff.mean() < 0.01
  assert (ours > 0).mean() > 0.05  # a real vessel map


def test_small_components_are_removed_vessels_kept():
  """Specks (8-connected components under min_size pixels) go, a vessel
  (one long component, diagonal steps included) stays whole; the jitted
  form (pure jax, also inside lax.map) gives the same map."""
  import jax
  import jax.numpy as jnp
  m = np.zeros((2, 32, 32), np.uint8)
  m[0, 4, 2:30] = 200  # a vessel ...
  for k in range(8):  # ... with a diagonal branch, 8-connected only
    m[0, 5 + k, 10 + k] = 120
  m[0, 20:22, 20:22] = 90  # a 4-pixel speck
  m[0, 28, 3] = 255  # a 1-pixel speck
  m[1, 10:15, 10:14] = 70  # 20 pixels: kept at min_size 20
  out = inference.remove_small_components(m, 20)
  assert out.dtype == np.uint8 and out.shape == m.shape
  np.testing.assert_array_equal(out[0, :16], m[0, :16])
  assert out[0, 16:].max() == 0
  np.testing.assert_array_equal(out[1], m[1])
  assert inference.remove_small_components(m, 21)[1].max() == 0
  np.testing.assert_array_equal(inference.remove_small_components(m, 0), m)
  f = jax.jit(lambda q: inference.despeckle(q, 20))
  np.testing.assert_array_equal(np.asarray(f(jnp.asarray(m, jnp.float32))),
                                out.astype(np.float32))
  g = jax.jit(lambda q: jax.lax.map(
      lambda x: inference.despeckle(x[None], 20)[0], q))
  np.testing.assert_array_equal(np.asarray(g(jnp.asarray(m, jnp.float32))),
                                out.astype(np.float32))
  # Random maps of every density and long thin lines (whose label groups
  # are small but open): the jax form equals scipy's labelling exactly.
  rng = np.random.default_rng(0)
  for density in (0.1, 0.3, 0.5, 0.7):
    q = ((rng.random((3, 48, 48)) < density)
         * rng.integers(51, 256, (3, 48, 48))).astype(np.float32)
    q[0, 7, 1:47] = 99
    for k in (2, 5, 20):
      np.testing.assert_array_equal(
          np.asarray(jax.jit(lambda x, k=k: inference.despeckle(x, k))(q)),
          inference.remove_small_components(q, k))


def test_a_despeckling_teacher_sees_at_inference_its_training_maps(tmp_path):
  """With data.min_component the trainer's stored maps and the inference
  input lose the same specks: a noisy photograph's map is despeckled the
  same way on both sides."""
  from skimage import data as skdata
  from efiqa_jax import fundus, synth
  from efiqa_jax.teacher import augment
  p = fundus.prepare_image(skdata.retina(), 256)
  img, _, _ = synth.degrade(p.image, p.fov_mask, 3, kinds=["noise"],
                            severity=0.8)
  Image.fromarray(img).save(tmp_path / "noisy.png")
  dc = _data_config(tmp_path / "noisy.png", min_component=20)
  maps, _, desc = data_lib.load_vessel_maps(dc)
  assert desc["min_component"] == 20
  raw, _, _ = data_lib.load_vessel_maps(_data_config(tmp_path / "noisy.png",
                                                     min_component=0))
  assert (maps > 0).sum() < 0.9 * (raw > 0).sum()  # noise left specks
  prep = fundus.prepare_fundus(str(tmp_path / "noisy.png"), size=256)
  out, _ = augment.augment(
      maps[0], np.random.default_rng(0), fov_p=0.0, orig_diameter=128,
      cfg=augment.AugmentConfig(out_size=64, hflip=False, vflip=False,
                                rotation=False))
  x = np.asarray(inference.teacher_input(
      prep.image[None], prep.fov_mask[None], teacher_size=64, load_size=128,
      min_component=20))[0, ..., 0]
  diff = np.abs(np.round(x * 255).astype(int) - out.astype(int))
  assert (diff > 1).mean() < 2e-3
  assert inference.min_component_of({"config": {"data": {
      "min_component": 20}}}) == 20
  assert inference.min_component_of({"image_size": 256}) == 0


def _data_config(path, min_component):
  import ml_collections
  return ml_collections.ConfigDict(dict(
      source="folder", vessels="label_free", path=str(path), split="all",
      work_size=256, load_size=128, gray_threshold=50,
      min_component=min_component))


def test_input_sizes_from_the_sidecar():
  assert inference.input_sizes({"image_size": 128, "config": {
      "data": {"load_size": 256}}}) == (256, 128)
  # A ported teacher (no training config) is cut at its own size.
  assert inference.input_sizes({"image_size": 256}) == (256, 256)


def test_anomaly_is_the_residual_magnitude(tmp_path):
  from flax import nnx
  from efiqa_jax.models.unet import UNet
  m = UNet(3, 3, base_channels=4, residual=True, rngs=nnx.Rngs(0))
  x = np.random.default_rng(0).random((2, 32, 32, 3)).astype(np.float32)
  a = np.asarray(inference.anomaly(m, x))
  ref = np.abs(np.asarray(m(x)) - x).mean(-1)
  np.testing.assert_allclose(a, ref, atol=1e-5)
  assert a.shape == (2, 32, 32)


def test_pool_is_the_anomalous_share_of_a_centred_window():
  t, ms = 16, 8  # 2x2 teacher pixels per map cell
  a = np.zeros((1, t, t), np.float32)
  a[0, :4, :4] = 0.1  # a 4x4 anomalous corner: map cells (0..1, 0..1)
  fov = np.ones((1, t, t), np.float32)
  one = np.asarray(inference.pool(a, fov, inference.MapRule(
      threshold=0.05, window=1, map_size=ms)))[0]
  assert one[:2, :2].tolist() == [[1, 1], [1, 1]] and one.sum() == 4
  three = np.asarray(inference.pool(a, fov, inference.MapRule(
      threshold=0.05, window=3, map_size=ms)))[0]
  # Corner: its window is clipped to 2x2 cells, all anomalous; (2, 2) sees
  # one anomalous cell of nine; (1, 1) four of nine.
  assert three[0, 0] == 1
  assert three[2, 2] == pytest.approx(1 / 9) and three[3, 3] == 0
  assert three[1, 1] == pytest.approx(4 / 9)
  # Outside the FOV nothing counts, and a window without FOV is 0.
  fov[0, :, 8:] = 0
  half = np.asarray(inference.pool(np.full_like(a, 0.1), fov,
                                   inference.MapRule(0.05, 1, ms)))[0]
  assert half[:, :4].min() == 1 and half[:, 4:].max() == 0
  with pytest.raises(ValueError, match="odd"):
    inference.MapRule(0.05, 4)


def test_splits_are_fixed_stratified_and_keep_both_eyes_together(tmp_path):
  for s, n in (("set_a", 20), ("set_b", 10)):
    d = tmp_path / s / "images"
    d.mkdir(parents=True)
    for i in range(n):
      for eye in ("L", "R"):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(
            d / f"{s}_{i:02d}{eye}.png")
  photos = data_lib.list_good_photos(str(tmp_path))
  assert len(photos) == 60 and {p.stratum for p in photos} == {"set_a",
                                                               "set_b"}
  splits = data_lib.assign_splits(photos)
  assert splits == data_lib.assign_splits(list(reversed(photos)))
  by = {}
  for p in photos:
    by.setdefault((p.stratum, splits[p.id]), set()).add(p.group)
  # Per set: round(20 %) of the subjects held out, round(15 %) calibrate.
  assert len(by["set_a", "heldout"]) == 4 and len(by["set_b", "heldout"]) == 2
  assert len(by["set_a", "calibration"]) == 3
  assert len(by["set_b", "calibration"]) == 2
  for p in photos:  # both eyes of a subject share the split
    twin = p.id[:-1] + ("R" if p.id.endswith("L") else "L")
    assert splits[twin] == splits[p.id]
  assert data_lib.subject_of("116_right") == "116"
  assert data_lib.subject_of("hrf_01_dr") == "hrf_01_dr"
  with pytest.raises(ValueError, match="unknown split"):
    data_lib.select_split(photos, "test")


def test_a_manifest_folder_lists_photographs_not_masks(tmp_path):
  (tmp_path / "s1" / "images").mkdir(parents=True)
  (tmp_path / "s1" / "vessels").mkdir()
  for n in ("a1", "a2"):
    for sub in ("images", "vessels"):
      Image.fromarray(np.zeros((4, 4), np.uint8)).save(
          tmp_path / "s1" / sub / f"{n}.png")
  (tmp_path / "manifest.csv").write_text(
      "id,image,vessels,set\n"
      "a1,s1/images/a1.png,s1/vessels/a1.png,s1\n"
      "a2,s1/images/a2.png,,s1\n")
  photos = data_lib.list_good_photos(str(tmp_path))
  assert [p.id for p in photos] == ["a1", "a2"]
  assert photos[0].vessels == os.path.join(str(tmp_path), "s1/vessels/a1.png")
  assert photos[1].vessels == "" and photos[0].stratum == "s1"
