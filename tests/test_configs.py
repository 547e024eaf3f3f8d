"""Every bundled config variant loads, by name or path, and gives a model
the downstream commands accept; typos and unknown variants are one line."""
import numpy as np
import pytest

from efiqa_jax import cli
from efiqa_jax import config_util
from efiqa_jax import quality_model


def _variants():
  for name in config_util.available():
    mod = config_util._import_file(config_util.resolve(name)[0])  # pylint: disable=protected-access
    for v in mod.VARIANTS:
      yield name, v


VARIANTS = list(_variants())


def test_every_config_lists_its_variants():
  names = {n for n, _ in VARIANTS}
  assert {"teacher", "teacher_default", "adapter", "adapter_cp",
          "adapter_synth", "encoder_mim"} <= names
  # The developers' guide: every config has a tiny variant for tests.
  assert {n for n, v in VARIANTS if v == "tiny"} == names


@pytest.mark.parametrize("name,variant", VARIANTS)
def test_variant_meets_downstream_constraints(name, variant, repo_root):
  spec = f"{name}:{variant}" if variant else name
  cfg = config_util.load_config(spec)  # runs the file's check()
  by_path = config_util.load_config(
      str(repo_root / "configs" / f"{name}.py") + (f":{variant}" if variant
                                                   else ""))
  assert cfg.to_dict() == by_path.to_dict()
  if name.startswith("teacher"):
    s = cfg.image_size
    # assess / calibrate-teacher / pseudo-label pool |f(x)| into a 64x64
    # map: the teacher's side must reshape into it (size 32 crashed).
    a = np.zeros((1, s, s), np.float32)
    maps = np.asarray(quality_model.pool_anomaly(a, a + 1, threshold=0.1))
    assert maps.shape == (1, quality_model.MAP_SIZE, quality_model.MAP_SIZE)
    assert cfg.data.load_size >= s
  elif name == "encoder_mim":
    assert cfg.size % cfg.encoder.patch_size == 0
    assert cfg.encoder.hidden_size % cfg.encoder.num_heads == 0
  else:  # adapters: the 16-px ViTs the README names (DINOv3, encoder_mim)
    assert cfg.size % 16 == 0
    if cfg.adapter.name == "modern_head_64to16":
      assert (cfg.size // 16) % 4 == 0 and cfg.batching == "image"


def test_names_and_repository_paths_resolve_from_anywhere(tmp_path,
                                                         monkeypatch):
  monkeypatch.chdir(tmp_path)  # no configs/ here
  for spec in ("teacher:tiny", "configs/teacher.py:tiny", "teacher.py:tiny"):
    assert config_util.load_config(spec).image_size == 64


@pytest.mark.parametrize("spec,overrides,match", [
    ("teacher:nope", [], r"teacher:nope: unknown variant 'nope' \(known: "
                         r"tiny, b32\)"),
    ("nope", [], r"config not found: 'nope' \(a file, or one of the bundled "
                 r"configs: adapter, .*teacher"),
    ("teacher:tiny", ["--config.image_siz=64"],
     r"unknown config key: image_siz; did you mean 'image_size'\?"),
    ("teacher:tiny", ["--config.image_size=32"],
     r"image_size 32 must be a multiple of 64"),
    ("adapter", ["--config.mode=end_to_end"], r"set batching='image'"),
    ("encoder_mim:tiny", ["--config.size=72"], r"not a multiple of"),
])
def test_config_errors_name_the_problem(spec, overrides, match):
  with pytest.raises(config_util.ConfigError, match=match):
    config_util.load_config(spec, overrides)


def test_cli_config_error_is_one_line(tmp_path, capsys):
  rc = cli.main(["train-teacher", "--config", "teacher:tiny",
                 "--workdir", str(tmp_path / "w"), "--config.lr_=1"])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and len(err.splitlines()) == 1, err
  assert "config error: unknown config key: lr_; did you mean 'lr'?" in err
  assert not (tmp_path / "w").exists()
