"""Progress for long jobs: a tqdm bar on a terminal (or in a notebook),
line-based progress elsewhere (pod logs, `nohup`, CI).

  with progress.Progress(total, "train-teacher", unit="step") as bar:
    for ...:
      bar.update(1)
      bar.set_postfix(loss=0.123)

Without a terminal a line like
  train-teacher: 120/1000 (12.0%), 3.4 step/s, ETA 4m19s, loss=0.123
is logged every `every_s` seconds (default 30, env EFIQA_PROGRESS_EVERY_S)
and once at the end, through the `efiqa_jax.progress` logger (so
`--log-level warning` silences it), or on stderr when logging is not set up.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Iterable, Iterator, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


def _in_notebook() -> bool:
  ip = sys.modules.get("IPython")
  if ip is None:
    return False
  try:
    shell = ip.get_ipython()
  except Exception:  # pylint: disable=broad-except
    return False
  return shell is not None and "Terminal" not in type(shell).__name__


def use_bar(stream=None) -> bool:
  """True where a live bar makes sense: a terminal or a notebook."""
  stream = sys.stderr if stream is None else stream
  try:
    tty = stream.isatty()
  except (AttributeError, ValueError):
    tty = False
  return tty or _in_notebook()


def format_secs(s: float) -> str:
  s = max(0, int(round(s)))
  h, rem = divmod(s, 3600)
  m, sec = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s" if m else f"{sec}s"


class Progress:
  """A bar or periodic lines; disabled (no output) when `enabled` is False
  (e.g. on every process but the first)."""

  def __init__(self, total: int | None, desc: str, *, initial: int = 0,
               unit: str = "step", enabled: bool = True,
               every_s: float | None = None, bar: bool | None = None):
    self.total, self.desc, self.unit = total, desc, unit
    self.n = self._n0 = int(initial)
    self.enabled = bool(enabled)
    self.every_s = float(os.environ.get("EFIQA_PROGRESS_EVERY_S", 30)
                         if every_s is None else every_s)
    self._postfix: dict[str, str] = {}
    self._t0 = self._last = time.monotonic()
    self._closed = False
    self._emitted = None
    self._tqdm = None
    if self.enabled and (use_bar() if bar is None else bar):
      from tqdm import auto as tqdm  # pylint: disable=g-import-not-at-top
      self._tqdm = tqdm.tqdm(total=total, initial=initial, desc=desc,
                             unit=unit, file=sys.stderr, leave=False)

  def update(self, n: int = 1) -> None:
    self.n += n
    if not self.enabled:
      return
    if self._tqdm is not None:
      self._tqdm.update(n)
      return
    now = time.monotonic()
    if now - self._last >= self.every_s:
      self._last = now
      self._emit()

  def set_postfix(self, **kw) -> None:
    self._postfix = {k: (f"{v:.4g}" if isinstance(v, float) else str(v))
                     for k, v in kw.items()}
    if self._tqdm is not None:
      self._tqdm.set_postfix(self._postfix, refresh=False)

  def line(self) -> str:
    done = self.n - self._n0
    dt = max(time.monotonic() - self._t0, 1e-9)
    rate = done / dt
    parts = [f"{self.desc}: {self.n}" + (f"/{self.total}" if self.total
                                         else "")]
    if self.total:
      parts[0] += f" ({100.0 * self.n / self.total:.1f}%)"
    parts.append(f"{rate:.3g} {self.unit}/s")
    if self.total and rate > 0 and self.n < self.total:
      parts.append(f"ETA {format_secs((self.total - self.n) / rate)}")
    elif self.n >= (self.total or float("inf")):
      parts.append(f"took {format_secs(dt)}")
    parts += [f"{k}={v}" for k, v in self._postfix.items()]
    return ", ".join(parts)

  def _emit(self) -> None:
    self._emitted = self.n
    text = self.line()
    if logging.getLogger().handlers:
      log.info("%s", text)
    else:
      print(text, file=sys.stderr, flush=True)

  def close(self) -> None:
    if self._closed:
      return
    self._closed = True
    if not self.enabled:
      return
    if self._tqdm is not None:
      self._tqdm.close()
    elif self.n > self._n0 and self._emitted != self.n:
      self._emit()

  def __enter__(self) -> "Progress":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def iterate(items: Iterable[T], desc: str, *, total: int | None = None,
            unit: str = "item", enabled: bool = True,
            every_s: float | None = None) -> Iterator[T]:
  """`for x in iterate(xs, "extract"):` with a bar or periodic lines."""
  if total is None:
    try:
      total = len(items)  # type: ignore[arg-type]
    except TypeError:
      total = None
  with Progress(total, desc, unit=unit, enabled=enabled,
                every_s=every_s) as p:
    for x in items:
      yield x
      p.update(1)
