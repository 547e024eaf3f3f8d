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


def _run_dir(tmp_path_factory) -> pathlib.Path:
  """A folder shared by every pytest-xdist worker of this run."""
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    base = base.parent
  return base / "efiqa_fresh"


@pytest.fixture(scope="session")
def efiqa_wheel(tmp_path_factory):
  """The wheel of the checkout, built once per run (tests/fresh_install.py)."""
  from tests import fresh_install  # pylint: disable=g-import-not-at-top
  return fresh_install.wheel_path(_run_dir(tmp_path_factory))


@pytest.fixture(scope="session")
def fresh_venv(tmp_path_factory):
  """One empty virtualenv (ipykernel only) per run; see fresh_install."""
  from tests import fresh_install  # pylint: disable=g-import-not-at-top
  return fresh_install.fresh_venv(_run_dir(tmp_path_factory))
