"""`assess`'s quality models run on the one local mesh of `sharding.py`
(`sharding.local_mesh`): the batch splits over the `data` axis of THIS
process's devices; a smaller given mesh computes the same maps."""
import jax
import numpy as np
import pytest
from flax import nnx

from efiqa_jax import quality_model as qm
from efiqa_jax import sharding as sh
from efiqa_jax.models import adapters
from efiqa_jax.models import unet
from efiqa_jax.models import vit


def _images(n, size, seed=0):
  rng = np.random.default_rng(seed)
  im = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
  yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
  fov = np.broadcast_to(np.hypot(yy, xx) < size / 2 - 2, (n, size, size))
  return im * fov[..., None].astype(np.uint8), np.ascontiguousarray(fov)


def test_local_mesh_is_this_process_data_axis():
  m = sh.local_mesh()
  assert m.axis_names == ("data",) and m.size == jax.local_device_count()
  two = sh.make_mesh([("data", 2)], devices=jax.local_devices()[:2])
  assert sh.local_mesh(two) is two


def test_student_on_the_local_mesh_and_on_a_given_one():
  enc = vit.VisionTransformer(patch_size=16, hidden_size=16, depth=1,
                              num_heads=2, mlp_hidden=32, rngs=nnx.Rngs(0))
  ada = adapters.build_adapter("linear", 16, seed=1)
  default = qm.StudentQualityModel(enc, ada, size=64, work_size=64,
                                   batch_size=3)
  assert default.batch_size == jax.local_device_count()  # 3 rounded up
  assert default._data.mesh.axis_names == ("data",)  # pylint: disable=protected-access
  two = sh.make_mesh([("data", 2)], devices=jax.local_devices()[:2])
  small = qm.StudentQualityModel(enc, ada, size=64, work_size=64,
                                 batch_size=3, mesh=two)
  assert small.batch_size == 4
  im, _ = _images(5, 64)
  a, b = default.predict_logits(im), small.predict_logits(im)
  assert a.shape == (5, 4, 4)
  np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_teacher_on_a_given_local_mesh():
  t = unet.UNet(3, 3, base_channels=4, residual=True, rngs=nnx.Rngs(0))
  meta = {"image_size": 64, "work_size": 64, "anomaly_threshold": 0.02}
  two = sh.make_mesh([("data", 2)], devices=jax.local_devices()[:2])
  a = qm.TeacherQualityModel(t, meta, batch_size=2)
  b = qm.TeacherQualityModel(t, meta, batch_size=2, mesh=two)
  assert (a.batch_size, b.batch_size) == (jax.local_device_count(), 2)
  im, fov = _images(3, 64, 1)
  np.testing.assert_allclose(a.predict(im, fov), b.predict(im, fov),
                             rtol=0, atol=1e-5)
  with pytest.raises(ValueError, match="no batch axis"):
    qm.TeacherQualityModel(t, meta, mesh=sh.make_mesh(
        [("model", 2)], devices=jax.local_devices()[:2]))
