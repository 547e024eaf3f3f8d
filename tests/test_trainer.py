"""The trainer skeleton, the runtime start-up, the sharding rules, metric
writers and line progress, on tiny tasks (the teacher and adapter tests run
the real trainers on it)."""
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from efiqa_jax import cli
from efiqa_jax import metric_writers
from efiqa_jax import progress
from efiqa_jax import runtime
from efiqa_jax import sharding as sh
from efiqa_jax import trainer


# ---------------------------------------------------------------- runtime


@pytest.mark.parametrize("flags,missing", [
    (["--num-processes", "2"], "--coordinator-address, --process-id missing"),
    (["--coordinator-address", "127.0.0.1:1234", "--process-id", "0"],
     "--num-processes missing"),
])
def test_partial_process_flags_are_one_clear_error(flags, missing, tmp_path,
                                                   capsys):
  rc = cli.main(flags + ["train-teacher", "--config",
                         "configs/teacher.py:tiny", "--workdir",
                         str(tmp_path)])
  assert rc == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("efiqa: error: incomplete "
                                             "multi-process configuration")
  assert missing in err[0]
  assert not os.listdir(tmp_path)  # nothing started


def test_partial_jax_environment_is_an_error(monkeypatch):
  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
  with pytest.raises(runtime.DistributedConfigError,
                     match="JAX_COORDINATOR_ADDRESS, JAX_PROCESS_ID missing"):
    runtime.initialize()
  monkeypatch.delenv("JAX_NUM_PROCESSES")
  assert runtime.initialize().process_count == 1
  assert runtime.initialize(num_processes=1).process_count == 1
  # Already one process here: asking to be another one is refused.
  with pytest.raises(runtime.DistributedConfigError, match="already runs"):
    runtime.initialize("127.0.0.1:1", 2, 1)
  runtime.barrier("single process: no-op")
  assert runtime.process_slice(5) == slice(0, 5, 1)


def test_help_documents_flags_and_exit_codes():
  text = " ".join(cli.build_parser().format_help().split())
  for s in ("--coordinator-address HOST:PORT", "--num-processes N",
            "--process-id I", "--log-level", "75 stopped by SIGTERM",
            "130 stopped by Ctrl-C"):
    assert s in text, s


def test_log_level_silences_absl_and_orbax():
  import logging
  runtime.setup_logging("info")
  assert logging.getLogger("absl").getEffectiveLevel() == logging.WARNING
  assert logging.getLogger("orbax").getEffectiveLevel() == logging.WARNING
  assert logging.getLogger("efiqa_jax.trainer").getEffectiveLevel() == (
      logging.INFO)
  runtime.setup_logging("debug")
  assert logging.getLogger("absl").getEffectiveLevel() == logging.DEBUG
  runtime.setup_logging("info")


# --------------------------------------------------------------- sharding


def test_rules_fullmatch_first_match_and_errors():
  mesh = sh.mesh_from_config({"data": 2, "fsdp": 2, "model": 2})
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "model": 2}
  assert sh.parse_mesh("model:2,data:-1") == [("data", -1), ("model", 2)]
  f32 = jnp.float32
  tree = {"blocks": {"0": {"mlp": {"kernel": jax.ShapeDtypeStruct((8, 4),
                                                                    f32)},
                           "norm": {"scale": jax.ShapeDtypeStruct((4,),
                                                                    f32)}}},
          "head": {"kernel": jax.ShapeDtypeStruct((4, 3), f32)}}
  rules = sh.with_rules(["('.*mlp/kernel', (None, 'model'))"],
                        [(".*kernel", "fsdp(min_mb=0)"), (".*", "replicate")])
  got = sh.tree_shardings(tree, rules, mesh)
  assert got["blocks"]["0"]["mlp"]["kernel"].spec == jax.P(None, "model")
  assert got["head"]["kernel"].spec == jax.P("fsdp", None)  # 4 | fsdp 2
  assert got["blocks"]["0"]["norm"]["scale"].spec == jax.P()
  # fullmatch: 'mlp/kernel' alone does not match 'blocks/0/mlp/kernel'.
  with pytest.raises(ValueError, match="matches no sharding rule"):
    sh.tree_shardings(tree, [("mlp/kernel", "replicate")], mesh)
  with pytest.raises(ValueError, match="dim 3 .* not divisible"):
    sh.tree_shardings({"head": tree["head"]}, [(".*", "(None, 'model')")],
                      mesh)
  with pytest.raises(ValueError, match="more entries"):
    sh.tree_shardings(tree, [(".*", "(None, 'model')")], mesh)
  with pytest.raises(ValueError, match="not in the mesh"):
    sh.tree_shardings(tree, [(".*", "('tensor',)")], mesh)
  with pytest.raises(ValueError, match="bad sharding spec"):
    sh.parse_rules([(".*", "shard-it-please")])
  # fsdp skips tensors under min_mb (default 4 MiB).
  assert sh.tree_shardings(tree, [(".*", "fsdp")], mesh)["head"][
      "kernel"].spec == jax.P()


def test_optimizer_state_follows_its_parameters():
  mesh = sh.mesh_from_config({"data": 2, "fsdp": 4})
  params = {"w": jax.ShapeDtypeStruct((8, 3), jnp.float32),
            "b": jax.ShapeDtypeStruct((3,), jnp.float32)}
  p_sh = sh.tree_shardings(params, [("w", "fsdp(min_mb=0)"),
                                    (".*", "replicate")], mesh)
  tx = trainer.make_optimizer(trainer.TrainConfig(
      total_steps=10, grad_clip_norm=1.0,
      schedule=dict(kind="cosine", warmup_steps=2)))
  o_sh = sh.opt_state_shardings(tx, jax.eval_shape(tx.init, params), p_sh,
                                mesh)
  adam = o_sh[1].inner_state[0]
  assert adam.mu["w"].spec == jax.P("fsdp", None) == adam.nu["w"].spec
  assert adam.mu["b"].spec == jax.P() and adam.count.spec == jax.P()


def test_schedules_warm_up_and_decay():
  lr = lambda kind, **kw: trainer.make_schedule(1.0, 10, dict(kind=kind,
                                                             **kw))
  assert trainer.make_schedule(0.5, 10, None) == 0.5  # constant: a float
  w = lr("constant", warmup_steps=4)
  np.testing.assert_allclose([w(s) for s in (0, 2, 4, 9)], [0, .5, 1, 1])
  c = lr("cosine", warmup_steps=2, end_fraction=0.1)
  np.testing.assert_allclose([c(0), c(2), c(10)], [0, 1, 0.1], atol=1e-6)
  li = lr("linear", end_fraction=0.0)
  np.testing.assert_allclose([li(0), li(5), li(10)], [1, .5, 0], atol=1e-6)
  with pytest.raises(ValueError, match="schedule.kind"):
    lr("exponential")
  with pytest.raises(ValueError, match="unknown schedule fields"):
    lr("cosine", warmup=3)
  with pytest.raises(ValueError, match="warmup_steps"):
    lr("cosine", warmup_steps=10)


# ------------------------------------------------------ writers, progress


def test_metric_writers_without_tensorboard(tmp_path):
  w = metric_writers.create(tmp_path, primary=True, tensorboard=False)
  w.write_hparams({"lr": 0.001})
  w.write_scalars(5, {"loss": np.float32(0.5)})
  w.write_scalars(10, {"loss": 0.25})
  w.write_images(10, {"anomaly": np.zeros((2, 8, 8, 1), np.float32),
                      "input": np.ones((2, 8, 8, 3), np.float32)})
  w.close()
  assert metric_writers.read_metrics(tmp_path) == [
      {"step": 5, "loss": 0.5}, {"step": 10, "loss": 0.25}]
  assert json.load(open(tmp_path / "hparams.json")) == {"lr": 0.001}
  im = np.asarray(Image.open(tmp_path / "panels" / "00000010_input.png"))
  assert im.shape == (8, 16, 3) and im.min() == 255
  assert not [f for f in os.listdir(tmp_path) if "tfevents" in f]
  # A resumed run at step 5 drops what the stopped run logged after it
  # (and a line cut by a kill).
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 15, "lo')
  w = metric_writers.create(tmp_path, primary=True, resume_step=5,
                            tensorboard=False)
  w.close()
  assert metric_writers.read_metrics(tmp_path) == [{"step": 5, "loss": 0.5}]
  # Other processes write nothing.
  w = metric_writers.create(tmp_path / "p1", primary=False)
  w.write_scalars(1, {"loss": 1.0})
  assert not (tmp_path / "p1").exists()


def test_without_the_tensorboard_package_one_line_names_the_extra(
    tmp_path, monkeypatch, caplog):
  """README "Installing": without `[tf]` the trainers write metrics.jsonl
  and panels/*.png and log one line naming the extra."""
  import builtins  # pylint: disable=g-import-not-at-top
  real_import = builtins.__import__

  def no_tensorboard(name, *a, **k):
    if name == "tensorboard" or name.startswith("tensorboard."):
      raise ImportError("No module named 'tensorboard'")
    return real_import(name, *a, **k)

  monkeypatch.setattr(builtins, "__import__", no_tensorboard)
  with caplog.at_level("INFO", logger=metric_writers.__name__):
    w = metric_writers.create(tmp_path, primary=True)
  w.write_scalars(1, {"loss": 0.5})
  w.write_images(1, {"panel": np.zeros((1, 4, 4, 1), np.float32)})
  w.close()
  lines = [r.getMessage() for r in caplog.records]
  assert len(lines) == 1 and "pip install 'efiqa-jax[tf]'" in lines[0], lines
  assert metric_writers.read_metrics(tmp_path) == [{"step": 1, "loss": 0.5}]
  assert (tmp_path / "panels" / "00000001_panel.png").exists()
  assert not [f for f in os.listdir(tmp_path) if "tfevents" in f]


def test_tensorboard_events_without_tensorflow(tmp_path):
  w = metric_writers.create(tmp_path, primary=True, tensorboard=True)
  w.write_scalars(3, {"loss": 0.5})
  w.write_images(3, {"panel": np.zeros((1, 4, 4, 1), np.float32)})
  w.close()
  (ev,) = [f for f in os.listdir(tmp_path) if "tfevents" in f]
  events = metric_writers.read_events(tmp_path / ev)
  vals = {v.tag: v for e in events for v in e.summary.value}
  assert vals["loss"].simple_value == 0.5
  assert vals["panel"].image.encoded_image_string.startswith(b"\x89PNG")


def test_progress_lines_without_a_terminal(caplog):
  import logging
  caplog.set_level(logging.INFO, logger="efiqa_jax.progress")
  p = progress.Progress(100, "train-x", initial=20, every_s=0, bar=False)
  p.update(30)
  p.set_postfix(loss=0.1234567)
  p.update(50)
  p.close()
  lines = [r.getMessage() for r in caplog.records
           if r.name == "efiqa_jax.progress"]
  assert len(lines) == 2
  assert lines[0].startswith("train-x: 50/100 (50.0%), ")
  assert "step/s" in lines[0] and "ETA" in lines[0]
  assert lines[-1].startswith("train-x: 100/100 (100.0%)")
  assert "took" in lines[-1] and "loss=0.1235" in lines[-1]
  caplog.clear()
  quiet = progress.Progress(10, "x", enabled=False, every_s=0, bar=False)
  quiet.update(10)
  quiet.close()
  assert not caplog.records


# -------------------------------------------------------- a tiny task


def _task(n_steps, on_step=None, seed=0):
  """Linear regression y = x @ w_true; batch s a function of s."""
  w_true = np.arange(1.0, 5.0, dtype=np.float32)[:, None]

  def batches():
    for s in range(n_steps):
      if on_step is not None:
        on_step(s)
      x = np.random.default_rng([seed, s]).normal(size=(8, 4)).astype(
          np.float32)
      yield {"x": x, "y": x @ w_true}

  def loss(p, b, rng, step):
    del rng, step
    return jnp.mean((b["x"] @ p["w"] - b["y"]) ** 2), {}

  return trainer.Task(name="regress", loss=loss, batches=batches,
                      global_batch=8, fingerprint={"seed": seed},
                      build=lambda: {"w": jnp.zeros((4, 1), jnp.float32)})


def test_fit_resumes_bit_exactly_and_refuses_another_run(tmp_path):
  tc = trainer.TrainConfig(total_steps=12, lr=0.5, checkpoint_every=4,
                           log_every=2, progress=False)
  full = trainer.fit(_task(12), tc, tmp_path / "a")
  assert full.history[-1][1] < 0.5 * full.history[0][1]
  part = trainer.fit(_task(12), tc, tmp_path / "b", _stop_after_steps=6)
  assert part.step == 6
  assert sorted(os.listdir(tmp_path / "b" / "checkpoints"), key=int) == ["4"]
  res = trainer.fit(_task(12), tc, tmp_path / "b")
  assert res.start_step == 4 and res.step == 12
  np.testing.assert_array_equal(res.params["w"], full.params["w"])
  assert [r["step"] for r in metric_writers.read_metrics(tmp_path / "b")] == [
      2, 4, 6, 8, 10, 12]
  run = json.load(open(tmp_path / "b" / "run.json"))
  assert run["seed"] == 0 and run["_trainer.total_steps"] == 12
  with pytest.raises(trainer.FingerprintMismatch,
                     match=r"_trainer.optimizer.lr 0.5 -> 0.1"):
    trainer.fit(_task(12), trainer.TrainConfig(
        total_steps=12, lr=0.1, checkpoint_every=4, progress=False),
                tmp_path / "b")


def test_steps_per_call_scans_the_same_steps(tmp_path):
  one = trainer.fit(_task(12), trainer.TrainConfig(
      total_steps=12, lr=0.5, log_every=4, progress=False), None)
  scan = trainer.fit(_task(12), trainer.TrainConfig(
      total_steps=12, lr=0.5, log_every=4, steps_per_call=5,
      progress=False), None)
  np.testing.assert_allclose(scan.params["w"], one.params["w"], rtol=1e-6)
  assert [s for s, _ in scan.history] == [5, 10, 12]


def test_sigint_stops_at_a_step_boundary_with_a_checkpoint(tmp_path):
  def ctrl_c(step):
    if step == 5:  # while batch 5 is drawn, i.e. during step 6
      os.kill(os.getpid(), signal.SIGINT)

  tc = trainer.TrainConfig(total_steps=12, lr=0.5, checkpoint_every=100,
                           progress=False)
  before = signal.getsignal(signal.SIGINT)
  with pytest.raises(runtime.Interrupted) as e:
    trainer.fit(_task(12, ctrl_c), tc, tmp_path)
  assert e.value.exit_code == runtime.EXIT_INTERRUPTED == 130
  assert "stopped by SIGINT after step 6/12; checkpoint 6 saved" in str(
      e.value)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["6"]
  assert signal.getsignal(signal.SIGINT) is before  # handler restored
  res = trainer.fit(_task(12), tc, tmp_path)
  full = trainer.fit(_task(12), tc, tmp_path / "full")
  np.testing.assert_array_equal(res.params["w"], full.params["w"])


def test_non_finite_loss_names_the_step(tmp_path):
  tc = trainer.TrainConfig(total_steps=6, lr=1e30, b1=0.0, b2=0.0,
                           checkpoint_every=2, log_every=100, progress=False)
  with pytest.raises(trainer.NonFiniteLossError, match=r"at step \d"):
    trainer.fit(_task(6), tc, tmp_path)
