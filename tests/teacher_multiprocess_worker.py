"""One JAX process of the 2-process teacher training test.

usage: teacher_multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT MAPS_DIR
       WORKDIR STOP_AFTER OUT_JSON

Trains the tiny teacher over a mesh spanning both processes (2 CPU devices
each), sharing one workdir (orbax checkpoints, per-process grain iterator
state). STOP_AFTER > 0 stops like a killed job after that many steps.
"""
import faulthandler
import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
  # A hang shows where each process waits (the test kills at 300 s).
  faulthandler.dump_traceback_later(240, exit=False)
  pid, nproc, port = map(int, sys.argv[1:4])
  maps_dir, workdir, stop, out_path = sys.argv[4], sys.argv[5], int(
      sys.argv[6]), sys.argv[7]
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.config.update("jax_disable_most_optimizations", True)
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                             num_processes=nproc, process_id=pid,
                             initialization_timeout=60)
  import numpy as np  # pylint: disable=g-import-not-at-top
  from efiqa_jax import config_util  # pylint: disable=g-import-not-at-top
  from efiqa_jax.teacher import train  # pylint: disable=g-import-not-at-top
  cfg = config_util.load_config(
      os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   "configs/teacher.py:tiny"),
      ["--config.data.source=folder", "--config.data.vessels=precomputed",
       f"--config.data.path={maps_dir}", "--config.progress_bar=False",
       "--config.augment.fov_min_diameter_px=28"])
  res = train.train_and_evaluate(cfg, workdir,
                                 _stop_after_steps=stop if stop > 0 else None)
  out = dict(step=res.step, history=res.history,
             devices=jax.device_count(), local=jax.local_device_count())
  if res.params is not None:
    out["params"] = [np.asarray(a).tolist() for a in jax.tree.leaves(
        res.params)]
  with open(out_path, "w") as f:
    json.dump(out, f)


if __name__ == "__main__":
  main()
