"""Test-wide setup: 8 fake CPU devices (set before jax is imported anywhere)."""
import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


def _shared_fundus_dir():
  env = os.environ.get("EFIQA_SHARED_FUNDUS")
  cand = pathlib.Path(env) if env else REPO.parent / "shared" / "data" / "fundus"
  return cand if cand.is_dir() else None


def shared_data(name: str) -> pathlib.Path:
  """../shared/data/NAME: skips when absent locally, fails under CI=true."""
  d = REPO.parent / "shared" / "data" / name
  if not d.is_dir():
    if os.environ.get("CI", "").lower() == "true":
      pytest.fail(f"../shared/data/{name} is absent (required under CI)")
    pytest.skip(f"../shared/data/{name} is absent")
  return d


@pytest.fixture(scope="session")
def fundus_dir():
  """The real photographs in ../shared/data/fundus (read there, never copied)."""
  d = _shared_fundus_dir()
  if d is None:
    return shared_data("fundus")
  return d


@pytest.fixture(scope="session")
def fundus_train_dir():
  """../shared/data/fundus_train: training photographs with FOV masks."""
  return shared_data("fundus_train")


@pytest.fixture(scope="session")
def repo_root():
  return REPO
