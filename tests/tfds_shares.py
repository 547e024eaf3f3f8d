"""The record paths each global batch row of the trainers' tfds: streams
holds (teacher: `TFDSMaps.batches`; adapter / MIM:
`student.data.encoder_batches`), for this process or a given one: shared by
the 2-process share test and its worker."""
from efiqa_jax import config_util

SEED, GLOBAL_BATCH, EPOCHS = 3, 4, 2


def teacher_ids(spec, work, process_index=None, process_count=None):
  from efiqa_jax.teacher import data as data_lib  # pylint: disable=g-import-not-at-top
  from efiqa_jax.teacher import train  # pylint: disable=g-import-not-at-top
  cfg = config_util.load_config("configs/teacher.py:tiny", [
      "--config.data.source=folder", f"--config.data.path={spec}",
      "--config.data.vessels=label_free", f"--config.data.work_size={work}",
      "--config.augment.fov_min_diameter_px=28"])
  tm = data_lib.streamed_maps(cfg.data)
  batches = tm.batches(
      seed=SEED, global_batch=GLOBAL_BATCH, num_epochs=EPOCHS,
      aug_cfg=train._aug_config(cfg), fov_p_max=0.5, fov_start=0,  # pylint: disable=protected-access
      fov_end=1, process_index=process_index, process_count=process_count)
  return [[tm.source.paths[int(i)] for i in b["index"]] for b in batches]


def encoder_ids(spec, work, process_index=None, process_count=None):
  from efiqa_jax.student import data as data_lib  # pylint: disable=g-import-not-at-top
  inputs = data_lib.encoder_inputs(spec, size=64, work_size=work,
                                   preprocess="fov")
  ok = sorted(inputs.by_id.values())
  src = data_lib.Labelled(inputs.source, ok)
  rows = data_lib.EncoderRows(64, work, "fov")
  batches = data_lib.encoder_batches(
      src, rows, seed=SEED, global_batch=GLOBAL_BATCH, num_epochs=EPOCHS,
      flip=True, prefetch_batches=0, process_index=process_index,
      process_count=process_count)
  return [[inputs.paths[ok[int(i)]] for i in b["index"]] for b in batches]
