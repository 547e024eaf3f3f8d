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


@pytest.fixture(scope="session")
def fundus_dir():
  """The real photographs in ../shared/data/fundus (read there, never copied).
  Absent: skipped locally, a failure under CI=true."""
  d = _shared_fundus_dir()
  if d is None:
    if os.environ.get("CI", "").lower() == "true":
      pytest.fail("../shared/data/fundus is absent (CI=true: tests that need "
                  "it must run)")
    pytest.skip("../shared/data/fundus is absent")
  return d


@pytest.fixture(scope="session")
def repo_root():
  return REPO
