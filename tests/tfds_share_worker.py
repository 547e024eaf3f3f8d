"""One JAX process of the 2-process tfds: share test (run by
test_train_adapter_from_prepared): which records this process reads.

usage: tfds_share_worker.py PROCESS_ID NUM_PROCESSES PORT SPEC WORK OUT_JSON

With TFDS_DATA_DIR set to the build. Writes, per step, the record paths of
this process's rows of the teacher's stream (`TFDSMaps.batches`) and of the
adapter's / MIM's stream (`student.data.encoder_batches`), the process
index and count taken from JAX as the trainers take them.
"""
import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
  pid, nproc, port = map(int, sys.argv[1:4])
  spec, work, out = sys.argv[4], int(sys.argv[5]), sys.argv[6]
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                             num_processes=nproc, process_id=pid,
                             initialization_timeout=300)
  assert jax.process_count() == nproc and jax.process_index() == pid
  from tests.tfds_shares import encoder_ids, teacher_ids  # pylint: disable=g-import-not-at-top
  with open(out, "w") as f:
    json.dump({"teacher": teacher_ids(spec, work),
               "encoder": encoder_ids(spec, work)}, f)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
