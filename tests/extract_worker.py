"""One JAX process of the 2-process extraction test (run by test_extract).

usage: extract_worker.py PROCESS_ID NUM_PROCESSES PORT ENCODER OUT_DIR
       BATCH INPUT...

Each process has 2 fake CPU devices; the mesh spans both processes (4
devices on 'data'). Runs `extract_features` in crop-free mode at size 64.
"""
import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
  pid, nproc, port = map(int, sys.argv[1:4])
  enc, out, batch = sys.argv[4], sys.argv[5], int(sys.argv[6])
  inputs = sys.argv[7:]
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                             num_processes=nproc, process_id=pid,
                             initialization_timeout=300)
  from efiqa_jax.encoders import extract  # pylint: disable=g-import-not-at-top
  assert jax.process_count() == nproc and len(jax.devices()) == 2 * nproc
  res = extract.extract_features(inputs, enc, out, size=64, preprocess="efiqa",
                                 batch_size=batch, read_threads=1)
  with open(os.path.join(out, f"report{pid}.json"), "w") as f:
    json.dump({"written": res.written, "failed": res.failed,
               "skipped": res.skipped}, f)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
