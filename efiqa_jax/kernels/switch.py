"""The kernels switch: every op in `efiqa_jax.kernels` takes its plain form
when it is off.

The value is a `jax.make_user_context`, part of jit's cache key: a function
traced with kernels on is traced again, not reused, with kernels off.
"""
from __future__ import annotations

import contextlib
import os

import jax

ENV = "EFIQA_KERNELS"
_ON, _OFF = ("on", "1", "true", "yes"), ("off", "0", "false", "no")


def _from_env() -> bool:
  v = os.environ.get(ENV, "on").strip().lower()
  if v in _ON or not v:
    return True
  if v in _OFF:
    return False
  raise ValueError(f"{ENV}={os.environ[ENV]!r}: expected on or off")


_STATE = jax.make_user_context(default_value=_from_env())


def enabled() -> bool:
  """Whether ops take their fast forms (decided when a function is traced)."""
  return bool(_STATE.value)


def set_enabled(on: bool) -> None:
  """Turn the kernels on or off for the whole process (all threads)."""
  _STATE.set_global(bool(on))


@contextlib.contextmanager
def disabled():
  """Within the block (this thread), every op takes its plain XLA form."""
  with _STATE(False):
    yield


def backend() -> str:
  """The platform ops dispatch on ("cpu", "gpu", "tpu")."""
  return jax.default_backend()


def on_cpu() -> bool:
  return backend() == "cpu"
