"""One JAX process of the 2-process pipeline test (run by test_multiprocess).

usage: multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT N GLOBAL_BATCH OUT_JSON

Builds the padded inference pipeline over N fake records, turns each host
batch into global arrays with `sharding.to_global`, and runs a jitted step
whose replicated outputs (an all-gather of `index`/`valid` and sums) show
what every process fed. Writes what it saw to OUT_JSON.
"""
import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
  pid, nproc, port, n, gb = map(int, sys.argv[1:6])
  out_path = sys.argv[6]
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                             num_processes=nproc, process_id=pid,
                             initialization_timeout=300)
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from efiqa_jax import input_pipeline as ip  # pylint: disable=g-import-not-at-top
  from efiqa_jax import sharding as sh  # pylint: disable=g-import-not-at-top
  from efiqa_jax import sources  # pylint: disable=g-import-not-at-top
  import pipeline_fakes as fakes  # pylint: disable=g-import-not-at-top

  assert jax.process_count() == nproc and jax.process_index() == pid
  mesh = sh.make_mesh()
  dsh = sh.data_sharding(mesh)
  rep = sh.replicated(mesh)
  batches = ip.inference_batches(
      fakes.fake_paths(n), gb, sharding=dsh,
      prepare=sources.PrepareFundus(8, load_fn=fakes.fake_prepare))

  @jax.jit
  def step(x):
    v = x["valid"]
    img_ok = jnp.all(jnp.where(
        v[:, None, None, None],
        x["image"].astype(jnp.int32) == (x["index"] % 251)[:, None, None,
                                                            None], True))
    return (jnp.sum(jnp.where(v, x["index"], 0)), jnp.sum(v), img_ok,
            jax.lax.with_sharding_constraint(x["index"], rep),
            jax.lax.with_sharding_constraint(v, rep))

  step = jax.jit(step, out_shardings=(rep, rep, rep, rep, rep))
  report = {"pid": pid, "steps_planned": batches.steps,
            "local_count": batches.local_count, "local_index": [],
            "gathered_index": [], "gathered_valid": [], "sums": [],
            "counts": [], "img_ok": [], "steps_run": 0,
            "global_shape": None}
  for host, g in ip.global_batches(batches, dsh):
    s, c, ok, gi, gv = step(g)
    report["global_shape"] = list(g["image"].shape)
    report["local_index"] += host["index"][host["valid"]].tolist()
    report["gathered_index"] += np.asarray(gi).tolist()
    report["gathered_valid"] += np.asarray(gv).tolist()
    report["sums"].append(int(s))
    report["counts"].append(int(c))
    report["img_ok"].append(bool(ok))
    report["steps_run"] += 1
    # A per-row output (sharded like the batch) maps back to this host's rows.
    local = sh.to_host_local(jax.jit(lambda i: i * 10)(g["index"]))
    report["host_order_ok"] = report.get("host_order_ok", True) and bool(
        (local == host["index"] * 10).all())
  # Every process holds the whole global batch; each feeds its own rows.
  full = sh.global_from_full({"r": np.arange(gb * 3, dtype=np.int32)}, dsh)
  report["full_roundtrip"] = np.asarray(jax.jit(
      lambda r: r, out_shardings=rep)(full["r"])).tolist()
  # Both processes save one model to one shared directory, repeatedly: one
  # sidecar writer, barriers around it (a race here once hung CI).
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from efiqa_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from efiqa_jax.models import unet  # pylint: disable=g-import-not-at-top
  shared = os.path.join(os.path.dirname(out_path), "shared_model")
  for k in range(4):
    checkpoints.save_model(shared, unet.UNet(base_channels=2,
                                             rngs=nnx.Rngs(k)),
                           {"round": k}, overwrite=True)
    report["saved_round"] = checkpoints.read_meta(shared)["round"]
  with open(out_path, "w") as f:
    json.dump(report, f)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
