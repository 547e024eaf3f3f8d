"""Training metrics on disk: JSON lines always, TensorBoard events beside them.

The writers follow clu's `MetricWriter` interface (`write_scalars`,
`write_images`, `write_hparams`, `flush`, `close`) without importing clu's
writer package, which imports TensorFlow (18-26 s on a 2-core machine, and
TensorFlow is an optional extra): TensorBoard event files are written
through the `tensorboard` package's record writer and protos alone.

  WORKDIR/metrics.jsonl   {"step": s, name: value, ...} per write_scalars
  WORKDIR/hparams.json    the flattened config
  WORKDIR/events.out.tfevents.*  scalars and image panels (TensorBoard),
                          when the `tensorboard` package is importable
  WORKDIR/panels/*.png    image panels, when it is not

Only process 0 writes (`create(..., primary=False)` is a no-op writer). On
resume at step s, rows after s (written by the run that was stopped) are
dropped from metrics.jsonl, so each step appears once; TensorBoard drops
such orphaned steps itself when it sees the step counter go back.
"""
from __future__ import annotations

import io
import json
import logging
import os
import socket
import time
from typing import Any, Mapping

import numpy as np
from etils import epath

from efiqa_jax import files

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
HPARAMS = "hparams.json"


def _row_image(v) -> np.ndarray:
  """(k,H,W,C) or (H,W,C) in [0,1] (or uint8) -> (H, k*W, C) uint8."""
  a = np.asarray(v)
  if a.ndim == 4:
    a = np.concatenate(list(a), axis=1)
  if a.dtype != np.uint8:
    a = (np.clip(a.astype(np.float32), 0, 1) * 255 + 0.5).astype(np.uint8)
  if a.ndim == 2:
    a = a[..., None]
  return a


def _png(a: np.ndarray) -> bytes:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(buf, "PNG")
  return buf.getvalue()


def _atomic_write_text(path: epath.Path, text: str) -> None:
  files.atomic_write_text(path, text)


class NullWriter:
  """What every process but the first gets."""

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    pass

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    pass

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    pass

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


class JsonlWriter(NullWriter):
  """Scalars as JSON lines; images as PNG files when `png_panels`.

  Local: appended and flushed row by row. An object store has no append
  (gcsfs's mode 'a' overwrites): the rows are kept in memory, after the
  rows already there, and the whole object is rewritten on `flush` (the
  trainer flushes at every checkpoint, so a resumed run finds every row up
  to its checkpoint) and at most every `REMOTE_FLUSH_S` seconds.
  """

  REMOTE_FLUSH_S = 30.0

  def __init__(self, workdir, *, png_panels: bool):
    self.workdir = epath.Path(workdir)
    self.png_panels = png_panels
    self._path = self.workdir / METRICS
    self._remote = files.is_remote(self._path)
    if self._remote:
      self._text = self._path.read_text() if self._path.exists() else ""
      if self._text and not self._text.endswith("\n"):
        self._text += "\n"  # a row cut by a kill stays one bad line
      self._dirty, self._last = False, time.monotonic()
      self._f = None
    else:
      self._f = self._path.open("a")

  def write_scalars(self, step, scalars):
    row = {"step": int(step)}
    row.update({k: float(v) for k, v in scalars.items()})
    line = json.dumps(row) + "\n"
    if self._remote:
      self._text += line
      self._dirty = True
      if time.monotonic() - self._last > self.REMOTE_FLUSH_S:
        self.flush()
      return
    self._f.write(line)
    self._f.flush()

  def write_images(self, step, images):
    if not self.png_panels:
      return
    d = self.workdir / "panels"
    d.mkdir(parents=True, exist_ok=True)
    for name, v in images.items():
      files.atomic_write_bytes(d / f"{int(step):08d}_{name}.png",
                               _png(_row_image(v)))

  def write_hparams(self, hparams):
    _atomic_write_text(self.workdir / HPARAMS,
                       json.dumps(hparams, indent=1, sort_keys=True,
                                  default=str))

  def flush(self):
    if not self._remote:
      self._f.flush()
    elif self._dirty:
      files.atomic_write_text(self._path, self._text)
      self._dirty, self._last = False, time.monotonic()

  def close(self):
    self.flush()
    if self._f is not None:
      self._f.close()


class TensorBoardWriter(NullWriter):
  """Scalars and image panels as a TensorBoard event file (no TensorFlow)."""

  def __init__(self, workdir, start_step: int = 0):
    from tensorboard.compat.proto import event_pb2, summary_pb2  # pylint: disable=g-import-not-at-top
    from tensorboard.summary.writer import record_writer  # pylint: disable=g-import-not-at-top
    self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
    name = (f"events.out.tfevents.{int(time.time())}."
            f"{socket.gethostname()}.{os.getpid()}.efiqa")
    self.path = epath.Path(workdir) / name
    self._rec = record_writer.RecordWriter(self.path.open("wb"))
    self._write(event_pb2.Event(wall_time=time.time(),
                                file_version="brain.Event:2"))
    if start_step:
      # A resumed run: TensorBoard drops what the stopped run logged after
      # this step.
      self._write(event_pb2.Event(
          wall_time=time.time(), step=int(start_step),
          session_log=event_pb2.SessionLog(
              status=event_pb2.SessionLog.START)))

  def _write(self, event):
    self._rec.write(event.SerializeToString())

  def _summary(self, step, values):
    self._write(self._event_pb2.Event(
        wall_time=time.time(), step=int(step),
        summary=self._summary_pb2.Summary(value=values)))

  def write_scalars(self, step, scalars):
    sp = self._summary_pb2
    self._summary(step, [sp.Summary.Value(tag=k, simple_value=float(v))
                         for k, v in scalars.items()])

  def write_images(self, step, images):
    sp = self._summary_pb2
    vals = []
    for name, v in images.items():
      a = _row_image(v)
      vals.append(sp.Summary.Value(tag=name, image=sp.Summary.Image(
          height=a.shape[0], width=a.shape[1], colorspace=a.shape[2],
          encoded_image_string=_png(a))))
    self._summary(step, vals)

  def write_hparams(self, hparams):
    sp = self._summary_pb2
    text = json.dumps(hparams, indent=1, sort_keys=True, default=str)
    # A text summary: TensorBoard's text tab shows the config.
    meta = sp.SummaryMetadata(plugin_data=sp.SummaryMetadata.PluginData(
        plugin_name="text"))
    from tensorboard.compat.proto import tensor_pb2, types_pb2  # pylint: disable=g-import-not-at-top
    tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING,
                                    string_val=[text.encode()])
    self._summary(0, [sp.Summary.Value(tag="config", metadata=meta,
                                       tensor=tensor)])

  def flush(self):
    self._rec.flush()

  def close(self):
    self._rec.close()


class MultiWriter(NullWriter):

  def __init__(self, writers):
    self.writers = list(writers)

  def write_scalars(self, step, scalars):
    for w in self.writers:
      w.write_scalars(step, scalars)

  def write_images(self, step, images):
    for w in self.writers:
      w.write_images(step, images)

  def write_hparams(self, hparams):
    for w in self.writers:
      w.write_hparams(hparams)

  def flush(self):
    for w in self.writers:
      w.flush()

  def close(self):
    for w in self.writers:
      w.close()


def truncate_metrics(workdir, after_step: int) -> int:
  """Drops metrics.jsonl rows with step > after_step (and a line cut by a
  kill); returns how many were dropped."""
  path = epath.Path(workdir) / METRICS
  if not path.exists():
    return 0
  keep, dropped = [], 0
  for line in path.read_text().splitlines():
    try:
      row = json.loads(line)
    except ValueError:
      dropped += 1
      continue
    if int(row.get("step", 0)) > after_step:
      dropped += 1
    else:
      keep.append(line)
  if dropped:
    _atomic_write_text(path, "".join(l + "\n" for l in keep))
  return dropped


def read_metrics(workdir) -> list[dict]:
  """The rows of WORKDIR/metrics.jsonl (a line cut by a kill is skipped)."""
  path = epath.Path(workdir) / METRICS
  rows = []
  if path.exists():
    for line in path.read_text().splitlines():
      try:
        rows.append(json.loads(line))
      except ValueError:
        pass
  return rows


def create(workdir, *, primary: bool, resume_step: int = 0,
           tensorboard: bool | None = None):
  """The writer of a training run in `workdir`.

  tensorboard: None = when the `tensorboard` package imports; False = JSON
  lines and PNG panels only.
  """
  if not primary:
    return NullWriter()
  truncate_metrics(workdir, resume_step)
  tb = None
  if tensorboard is not False:
    try:
      tb = TensorBoardWriter(workdir, resume_step)
    except ImportError as e:
      if tensorboard:
        raise
      log.info("TensorBoard events off (%s: they need the tensorboard "
               "package, pip install 'efiqa-jax[tf]'); metrics in %s/%s, "
               "panels in %s/panels", e, workdir, METRICS, workdir)
  writers = [JsonlWriter(workdir, png_panels=tb is None)]
  if tb is not None:
    writers.append(tb)
  return MultiWriter(writers)


def read_events(path) -> list:
  """Events of a TensorBoard event file (for tests and scripts; no TF)."""
  import struct  # pylint: disable=g-import-not-at-top
  from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
  data = epath.Path(path).read_bytes()
  out, i = [], 0
  while i + 12 <= len(data):
    (n,) = struct.unpack("<Q", data[i:i + 8])
    if i + 12 + n + 4 > len(data):
      break  # a record cut by a kill
    out.append(event_pb2.Event.FromString(data[i + 12:i + 12 + n]))
    i += 12 + n + 4
  return out
