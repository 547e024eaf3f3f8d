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


def pytest_configure(config):
  """One persistent XLA compilation cache for the whole run (every xdist
  worker and every `efiqa` subprocess inherits it): the tests compile the
  same tiny programs many times (reruns after a kill, both processes of a
  2-process run, the same model in several files). Per run, so nothing
  stale is ever read; EFIQA_TEST_JAX_CACHE=0 turns it off."""
  if hasattr(config, "workerinput") or os.environ.get(
      "EFIQA_TEST_JAX_CACHE", "1") == "0":
    return
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile  # pylint: disable=g-import-not-at-top
    config._efiqa_xla_cache = tempfile.mkdtemp(prefix="efiqa-test-xla-cache-")  # pylint: disable=protected-access
    os.environ["JAX_COMPILATION_CACHE_DIR"] = config._efiqa_xla_cache  # pylint: disable=protected-access
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def pytest_unconfigure(config):
  cache = getattr(config, "_efiqa_xla_cache", None)
  if cache:
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(cache, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
  """Modules that hold slow or multi-process tests run first, each module's
  own order kept (so are its module-scoped fixtures): with `-n 2` the long
  tests start early and the short ones fill in around them, instead of the
  longest starting last and running alone at the end."""
  del config
  module = lambda it: it.nodeid.split("::")[0]
  heavy = {module(it) for it in items
           if it.get_closest_marker("slow")
           or it.get_closest_marker("multiprocess")}
  items[:] = sorted(items, key=lambda it: module(it) not in heavy)


# Environment variables that point a folder of ../shared/data elsewhere.
SHARED_DATA_ENV = {"fundus": "EFIQA_SHARED_FUNDUS"}


def _shared_data_path(name: str) -> pathlib.Path:
  env = os.environ.get(SHARED_DATA_ENV.get(name, ""), "")
  return pathlib.Path(env) if env else REPO.parent / "shared" / "data" / name


def shared_data_dir(name: str) -> pathlib.Path | None:
  """../shared/data/NAME (or $EFIQA_SHARED_FUNDUS for `fundus`), or None."""
  cand = _shared_data_path(name)
  return cand if cand.is_dir() else None


def in_ci() -> bool:
  return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def require_shared_data(name: str) -> pathlib.Path:
  """The real data in ../shared/data/NAME (read there, never copied).

  Absent: the test is skipped locally but FAILS under CI=true, so that a CI
  run without the data cannot pass by skipping every real-photograph test."""
  d = shared_data_dir(name)
  if d is None:
    msg = f"{_shared_data_path(name)} (../shared/data/{name}) is absent"
    if in_ci():
      pytest.fail(f"{msg} (CI=true: the tests on real photographs must run)",
                  pytrace=False)
    pytest.skip(msg)
  return d


@pytest.fixture(scope="session")
def fundus_dir():
  """The 10 real evaluation photographs in ../shared/data/fundus."""
  return require_shared_data("fundus")


@pytest.fixture(scope="session")
def shared_data():
  """`shared_data("fundus_train")`: require_shared_data as a fixture."""
  return require_shared_data


@pytest.fixture(scope="session")
def fundus_train_dir():
  """../shared/data/fundus_train: training photographs with FOV masks."""
  return require_shared_data("fundus_train")


@pytest.fixture(scope="module")
def synth_tfds(tmp_path_factory):
  """`efiqa synth` photographs (160 px) and the same folder built as the
  data/efiqa_synth TFDS dataset (ArrayRecord): (images folder, data_dir)."""
  from data import build as data_build
  from efiqa_jax.synth import dataset
  manual = tmp_path_factory.mktemp("synth")
  dataset.write_dataset(manual, n=4, seed=0, size=160)
  data_dir = tmp_path_factory.mktemp("tfds")
  data_build.build("efiqa_synth", str(manual), str(data_dir))
  return str(manual / "images"), str(data_dir)


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
