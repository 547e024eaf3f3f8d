"""Run a test worker script as N real JAX processes on 127.0.0.1.

The one place the multi-process tests spawn workers: a free coordinator port,
the repository on PYTHONPATH, XLA_FLAGS left to the worker (it sets its own
device count), a timeout after which every worker is killed and the test
fails with the tail of each worker's log, and a non-zero exit shown with its
log.
"""
import os
import socket
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_workers(script: str, args_of, nproc: int = 2, timeout: int = 120,
                what: str = "multi-process test") -> list[str]:
  """Starts `script` (in tests/) once per process i with argv
  `[i, nproc, port, *args_of(i)]`; returns the workers' logs."""
  port = free_port()
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env["PYTHONPATH"] = os.path.dirname(HERE)
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(HERE, script), str(i), str(nproc),
       str(port), *map(str, args_of(i))],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(nproc)]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=timeout)[0])
  except subprocess.TimeoutExpired:
    tails = []
    for i, p in enumerate(procs):
      p.kill()
      tails.append(f"--- process {i}:\n" + (p.communicate()[0] or "")[-6000:])
    pytest.fail(f"{what} hung (killed after {timeout} s)\n" + "\n".join(tails))
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  return logs
