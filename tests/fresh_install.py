"""A wheel built from the checkout and a fresh virtualenv, once per test run.

`wheel_path(base)` builds `efiqa_jax-*.whl` from a copy of the checkout's
files (what git would commit: tracked plus untracked-but-not-ignored), so
the build never writes into the checkout. `fresh_venv(base)` creates an
empty virtualenv with only what runs a notebook kernel (ipykernel): the
colabs install efiqa-jax into it with their own install cell. Both live
under `base` (tests pass the directory shared by all pytest-xdist workers)
behind a file lock, so the whole run builds one wheel and one venv. pip's
cache is the user's, as for any install. Later whole-walk tests (a wheel
installed outside the repository going through every command) reuse them.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
import shutil
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def _locked(path: pathlib.Path):
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def source_files() -> list[str]:
  """The checkout's files as a commit would hold them (relative paths)."""
  try:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard",
         "-z"], cwd=REPO, check=True, capture_output=True).stdout
    files = [f for f in out.decode().split("\0") if f]
    return [f for f in files if (REPO / f).is_file()]
  except (OSError, subprocess.CalledProcessError):  # not a git checkout
    skip = {".git", "build", "dist", "__pycache__", ".pytest_cache"}
    return [str(p.relative_to(REPO)) for p in REPO.rglob("*")
            if p.is_file() and not skip & set(p.relative_to(REPO).parts)
            and not p.name.endswith(".pyc")]


def wheel_path(base: pathlib.Path) -> pathlib.Path:
  """Builds (once) and returns the wheel of the checkout."""
  base = pathlib.Path(base)
  out = base / "wheel"
  with _locked(base / "wheel.lock"):
    found = sorted(out.glob("efiqa_jax-*.whl"))
    if found:
      return found[0]
    src = base / "src"
    shutil.rmtree(src, ignore_errors=True)
    for f in source_files():
      (src / f).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(REPO / f, src / f)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                    "-w", str(out), str(src)], check=True,
                   capture_output=True)
    shutil.rmtree(src, ignore_errors=True)
    return sorted(out.glob("efiqa_jax-*.whl"))[0]


def venv_python(venv: pathlib.Path) -> pathlib.Path:
  return pathlib.Path(venv) / "bin" / "python"


@contextlib.contextmanager
def _new_venv(base, name: str):
  """(venv, ready) under a lock shared by every xdist worker: `ready` when an
  earlier call finished it; else an empty venv, marked ready once the body
  (the installs) returns without an error."""
  base = pathlib.Path(base)
  venv = base / name
  with _locked(base / f"{name}.lock"):
    if (venv / ".ready").exists():
      yield venv, True
      return
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    yield venv, False
    (venv / ".ready").write_text("")


def fresh_venv(base: pathlib.Path) -> pathlib.Path:
  """Creates (once) an empty virtualenv holding only ipykernel."""
  with _new_venv(base, "venv") as (venv, ready):
    if ready:
      return venv
    subprocess.run([str(venv_python(venv)), "-m", "pip", "install", "-q",
                    "-c", str(REPO / "constraints.txt"), "ipykernel"],
                   check=True, capture_output=True)
    return venv


def core_venv(base: pathlib.Path, wheel: pathlib.Path) -> pathlib.Path:
  """Creates (once) a virtualenv with the wheel's core install: `pip install
  WHEEL`, no extra, the tested versions (what the README's first command
  gives a newcomer). Separate from `fresh_venv`, which the colabs fill with
  their extras. Records the install's wall time in `install_seconds`."""
  with _new_venv(base, "core_venv") as (venv, ready):
    if ready:
      return venv
    env = pip_env(venv)
    env["PIP_NO_COMPILE"] = "1"  # bytecode is compiled on import
    t0 = time.monotonic()
    res = subprocess.run([str(venv_python(venv)), "-m", "pip", "install", "-q",
                          str(wheel)], env=env, capture_output=True, text=True)
    if res.returncode:
      raise RuntimeError(f"pip install {wheel} failed:\n{res.stderr[-3000:]}")
    (venv / "install_seconds").write_text(f"{time.monotonic() - t0:.1f}\n")
    return venv


def pip_env(venv: pathlib.Path) -> dict:
  """Environment for running inside `venv` (PATH first, no PYTHONPATH: the
  checkout must not leak in) and pinning pip to the tested versions."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
  env["PATH"] = f"{pathlib.Path(venv) / 'bin'}{os.pathsep}{env.get('PATH', '')}"
  env["VIRTUAL_ENV"] = str(venv)
  env["PIP_CONSTRAINT"] = str(REPO / "constraints.txt")
  return env
