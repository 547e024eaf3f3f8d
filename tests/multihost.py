"""Run N real JAX processes on 127.0.0.1: a test worker script, or the `efiqa`
command started with nothing but its global process flags.

The one place the multi-process tests spawn workers: a free coordinator port,
the repository on PYTHONPATH, a timeout after which every worker is killed and
the test fails with the tail of each worker's log, and a non-zero exit shown
with its log.
"""
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int | None, fast_compile: bool = True,
         compile_cache: bool = True) -> dict:
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  if not compile_cache:  # a test that needs the compilation to take time
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
  if devices is not None:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    # Tiny models: XLA's optimisation passes dominate CPU compile time. (A
    # test comparing bits with an in-process run compiles like that run.)
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "true" if fast_compile else "false"
  env["PYTHONPATH"] = REPO
  return env


def _popen(argv, **kw) -> subprocess.Popen:
  """A process whose output goes to a file (no pipe to fill while we poll);
  `log(p)` reads it."""
  f = tempfile.TemporaryFile("w+")
  p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, text=True,
                       **kw)
  p.log_file = f
  return p


def log(p: subprocess.Popen) -> str:
  p.log_file.seek(0)
  return p.log_file.read()


def _wait(procs, timeout, what, kill_when=None):
  """-> (logs, killed): waits for every process; `kill_when()` True kills
  them all with SIGKILL (a hard kill mid-run)."""
  deadline = time.monotonic() + timeout
  killed = False
  while any(p.poll() is None for p in procs):
    if time.monotonic() > deadline:
      tails = []
      for i, p in enumerate(procs):
        p.kill()
        p.wait()
        tails.append(f"--- process {i}:\n" + log(p)[-6000:])
      pytest.fail(f"{what} hung (killed after {timeout} s)\n" + "\n".join(tails))
    if kill_when is not None and not killed and kill_when():
      for p in procs:
        if p.poll() is None:
          p.send_signal(signal.SIGKILL)
      killed = True
    time.sleep(0.1)
  return [log(p) for p in procs], killed


def run_workers(script: str, args_of, nproc: int = 2, timeout: int = 900,
                what: str = "multi-process test") -> list[str]:
  """Starts `script` (in tests/) once per process i with argv
  `[i, nproc, port, *args_of(i)]`; returns the workers' logs."""
  port = free_port()
  procs = [_popen(
      [sys.executable, os.path.join(HERE, script), str(i), str(nproc),
       str(port), *map(str, args_of(i))], env=_env(None))
           for i in range(nproc)]
  logs, _ = _wait(procs, timeout, what)
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  return logs


def run_efiqa(args_of, nproc: int = 2, *, devices: int = 2,
              timeout: int = 900, what: str = "multi-process efiqa",
              kill_when=None):
  """`efiqa --coordinator-address 127.0.0.1:PORT --num-processes N
  --process-id i ARGS...` once per process i (cwd: the repository), each
  with `devices` CPU devices. -> ([(returncode, log)], killed). Without
  `kill_when` every process must exit 0."""
  port = free_port()
  procs = [_popen(
      [sys.executable, "-m", "efiqa_jax", "--coordinator-address",
       f"127.0.0.1:{port}", "--num-processes", str(nproc), "--process-id",
       str(i), *map(str, args_of(i))], cwd=REPO, env=_env(devices))
           for i in range(nproc)]
  logs, killed = _wait(procs, timeout, what, kill_when)
  if kill_when is None:
    for p, log in zip(procs, logs):
      assert p.returncode == 0, log[-3000:]
  return [(p.returncode, log) for p, log in zip(procs, logs)], killed


def start_efiqa(args, *, devices: int = 8, fast_compile: bool = True,
                compile_cache: bool = True) -> subprocess.Popen:
  """One `efiqa ARGS...` process (output in `log(p)`), for tests that
  signal it."""
  return _popen([sys.executable, "-m", "efiqa_jax", *map(str, args)],
                cwd=REPO, env=_env(devices, fast_compile, compile_cache))


def finish(p: subprocess.Popen, timeout: float, what: str) -> tuple[int, str]:
  """(returncode, log) of `p`; fails with the log after `timeout` s."""
  try:
    p.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    p.kill()
    p.wait()
    pytest.fail(f"{what}: timed out\n" + log(p)[-4000:])
  return p.returncode, log(p)


def checkpoint_steps(workdir) -> list[int]:
  """Committed orbax checkpoint steps in WORKDIR/checkpoints."""
  d = os.path.join(str(workdir), "checkpoints")
  if not os.path.isdir(d):
    return []
  return sorted(int(f) for f in os.listdir(d) if f.isdigit())


def wait_for(cond, proc, timeout: float, what: str):
  """Polls `cond()` until True; fails with the log if `proc` exits first or
  the time runs out."""
  deadline = time.monotonic() + timeout
  while not cond():
    if proc.poll() is not None:
      pytest.fail(f"{what}: exited {proc.returncode} first\n"
                  + log(proc)[-4000:])
    if time.monotonic() > deadline:
      proc.kill()
      proc.wait()
      pytest.fail(f"{what}: timed out\n" + log(proc)[-4000:])
    time.sleep(0.1)
