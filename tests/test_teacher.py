"""VUAD teacher: masking, schedules, RandomFOV, pipeline, training, resume."""
import os
import signal

import numpy as np
import pytest
from PIL import Image, ImageDraw

import jax
import jax.numpy as jnp

from efiqa_jax import config_util
from efiqa_jax.teacher import augment as aug_lib
from efiqa_jax.teacher import data as data_lib
from efiqa_jax.teacher import masking
from efiqa_jax.teacher import train
from tests import multihost


# ------------------------------------------------------------------ masking


def test_mask_fraction_tracks_gamma_and_k_range():
  keep, k, gamma = jax.jit(
      lambda r: masking.sample_grid_mask(r, 512, 64, 64, min_ratio=0.0))(
          jax.random.key(0))
  keep, k, gamma = map(np.asarray, (keep, k, gamma))
  assert set(np.unique(keep)) <= {0.0, 1.0}
  assert k.min() >= 4 and k.max() <= 32
  assert len(np.unique(k)) > 20  # uniform over 4..32 inclusive
  assert gamma.min() >= 0.0 and gamma.max() <= 1.0
  masked = 1.0 - keep.mean(axis=(1, 2))
  # Per sample: masked fraction ~ gamma (binomial over K^2 cells, unequal
  # cell areas); across samples the correlation is near 1 and the mean
  # matches within 0.02.
  assert np.corrcoef(masked, gamma)[0, 1] > 0.95
  assert abs(masked.mean() - gamma.mean()) < 0.02
  big = k >= 24  # many cells -> tight per-sample agreement
  assert np.abs(masked[big] - gamma[big]).max() < 0.2


def test_mask_min_ratio_bounds_and_determinism():
  f = jax.jit(lambda r, m: masking.sample_grid_mask(r, 256, 32, 32,
                                                    min_ratio=m))
  keep, _, gamma = f(jax.random.key(3), jnp.float32(0.8))
  assert float(gamma.min()) >= 0.8
  assert 1.0 - float(keep.mean()) > 0.8  # masked fraction ~ U[0.8,1] mean .9
  keep2, _, _ = f(jax.random.key(3), jnp.float32(0.8))
  keep3, _, _ = f(jax.random.key(4), jnp.float32(0.8))
  np.testing.assert_array_equal(np.asarray(keep), np.asarray(keep2))
  assert not np.array_equal(np.asarray(keep), np.asarray(keep3))


def test_mask_cells_are_blocks_of_the_coarse_grid():
  keep, k, _ = jax.jit(lambda r: masking.sample_grid_mask(
      r, 8, 64, 64, min_ratio=0.3))(jax.random.key(1))
  rows_all = np.asarray(jax.jit(masking.nearest_indices, static_argnums=(1, 2))(
      k, 64))
  for b in range(8):
    kk = int(k[b])
    rows = rows_all[b]
    m = np.asarray(keep[b])
    # Pixels mapping to the same coarse cell share one value.
    for i in range(kk):
      for j in range(kk):
        cell = m[np.ix_(rows == i, rows == j)]
        assert cell.size > 0 and (cell == cell.flat[0]).all()


def test_nearest_indices_match_torch_interpolate():
  torch = pytest.importorskip("torch")
  ks = jnp.arange(4, 33)
  for size in (32, 64, 256, 100):
    ours = np.asarray(jax.jit(masking.nearest_indices, static_argnums=(1, 2))(
        ks, size))
    for i, kk in enumerate(range(4, 33)):
      grid = torch.arange(kk, dtype=torch.float32).view(1, 1, kk, 1)
      ref = torch.nn.functional.interpolate(grid, size=(size, 1),
                                            mode="nearest")
      np.testing.assert_array_equal(ours[i], ref.view(-1).numpy().astype(int))


def test_apply_grid_mask_zeroes_all_channels():
  x = jnp.ones((4, 32, 32, 3))
  xm, info = jax.jit(lambda r, x: masking.apply_grid_mask(
      r, x, min_ratio=0.5))(jax.random.key(0), x)
  keep = np.asarray(info["keep"])
  np.testing.assert_array_equal(np.asarray(xm), np.repeat(keep[..., None], 3,
                                                          -1))


# ---------------------------------------------------------------- schedules


@pytest.mark.parametrize("epoch,min_ratio,fov_p", [
    (0, 0.8, 0.0), (20, 0.8, 0.0), (50, 0.4, 0.25), (80, 0.0, 0.5),
    (99, 0.0, 0.5)])
def test_schedules(epoch, min_ratio, fov_p):
  cfg = config_util.load_config("configs/teacher.py")
  m, p = train._schedule_values(cfg, epoch)
  assert m == pytest.approx(min_ratio, abs=1e-9)
  assert p == pytest.approx(fov_p, abs=1e-9)
  # Traced version agrees (the step receives it as a traced scalar).
  traced = jax.jit(lambda e: masking.min_ratio_schedule(e))(jnp.float32(epoch))
  assert float(traced) == pytest.approx(min_ratio, abs=1e-6)


# ---------------------------------------------------------------- RandomFOV


def _disc_map(size=128):
  c = (np.arange(size) + 0.5 - size / 2) / (size / 2)
  disc = (c[None] ** 2 + c[:, None] ** 2) <= 1
  return np.where(disc, 200, 0).astype(np.uint8)


def test_random_fov_properties():
  cfg = aug_lib.AugmentConfig(out_size=64, rotation=False, hflip=False,
                              vflip=False, fov_min_diameter_px=224)
  vmap = np.full((128, 128), 200, np.uint8)
  outside = ~aug_lib.circle_mask(64)
  ratios = []
  for i in range(200):
    rng = np.random.default_rng([7, i])
    out, info = aug_lib.augment(vmap, rng, fov_p=1.0, orig_diameter=512,
                                cfg=cfg)
    assert info["fov_crop"]
    assert (out[outside] == 0).all()  # black outside the new circle
    assert (out[aug_lib.circle_mask(64)] > 0).mean() > 0.95
    ratios.append(info["fov_ratio"])
    # centre inside the disc of radius R_orig - R_new
    ratio, cx, cy = aug_lib.fov_params(np.random.default_rng([7, i]), 128, 512,
                                       cfg)
    r_orig = 64.0
    assert np.hypot(cx - r_orig, cy - r_orig) <= r_orig * (1 - ratio) + 1e-9
  ratios = np.array(ratios)
  assert ratios.min() >= 0.5 and ratios.max() <= 1.0
  assert ratios.min() < 0.55 and ratios.max() > 0.95  # spans the range
  # min diameter 224 at original scale: a 300 px original allows >= 0.747.
  r = [aug_lib.fov_params(np.random.default_rng(i), 128, 300, cfg)[0]
       for i in range(100)]
  assert min(r) >= 224 / 300 - 1e-9
  # Too small to crop at all -> no crop, no error.
  assert aug_lib.fov_params(np.random.default_rng(0), 128, 200, cfg) is None


def test_augment_probability_and_determinism():
  cfg = aug_lib.AugmentConfig(out_size=32, fov_min_diameter_px=28)
  vmap = _disc_map(64)
  crops = [aug_lib.augment(vmap, np.random.default_rng([1, i]), fov_p=0.5,
                           orig_diameter=64, cfg=cfg)[1]["fov_crop"]
           for i in range(400)]
  assert 0.4 < np.mean(crops) < 0.6
  never = [aug_lib.augment(vmap, np.random.default_rng([1, i]), fov_p=0.0,
                           orig_diameter=64, cfg=cfg)[1]["fov_crop"]
           for i in range(50)]
  assert not any(never)
  a, _ = aug_lib.augment(vmap, np.random.default_rng([5, 9]), fov_p=0.5,
                         orig_diameter=64, cfg=cfg)
  b, _ = aug_lib.augment(vmap, np.random.default_rng([5, 9]), fov_p=0.5,
                         orig_diameter=64, cfg=cfg)
  np.testing.assert_array_equal(a, b)
  assert a.shape == (32, 32) and a.dtype == np.uint8
  with pytest.raises(ValueError, match="square"):
    aug_lib.augment(np.zeros((10, 12), np.uint8), np.random.default_rng(0),
                    fov_p=0, orig_diameter=12, cfg=cfg)


# ------------------------------------------------------------------ data


def _write_maps(folder, n=16, size=64):
  os.makedirs(folder, exist_ok=True)
  for i in range(n):
    rng = np.random.default_rng(i)
    im = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(im)
    for _ in range(6):
      pts = [tuple(rng.uniform(4, size - 4, 2)) for _ in range(4)]
      d.line(pts, fill=int(rng.integers(150, 256)),
             width=int(rng.integers(1, 3)))
    if i == 0:  # an RGB map with faint noise that the threshold removes
      arr = np.asarray(im)
      arr = np.where(arr == 0, 40, arr).astype(np.uint8)
      Image.fromarray(np.stack([arr] * 3, -1)).save(f"{folder}/m{i:02d}.png")
    else:
      im.save(f"{folder}/m{i:02d}.png")
  return str(folder)


@pytest.fixture(scope="module")
def maps_dir(tmp_path_factory):
  return _write_maps(tmp_path_factory.mktemp("maps"))


def test_load_maps_threshold_and_bad_files(maps_dir, tmp_path):
  cfg = config_util.load_config("configs/teacher.py:tiny", [
      "--config.data.source=folder", "--config.data.vessels=precomputed",
      f"--config.data.path={maps_dir}"])
  maps, diam, desc = data_lib.load_vessel_maps(cfg.data, str(tmp_path))
  assert maps.shape == (16, 64, 64) and maps.dtype == np.uint8
  assert desc["num_maps"] == 16 and (diam == 64).all()
  assert maps[0].min() == 0 and ((maps > 0) & (maps <= 50)).sum() == 0
  # cached: second load reads the npz
  assert any(f.startswith("vessel_maps_") for f in os.listdir(tmp_path))
  bad = tmp_path / "bad"
  _write_maps(bad, n=2)
  (bad / "broken.png").write_bytes(b"not a png")
  cfg.data.path = str(bad)
  maps, _, desc = data_lib.load_vessel_maps(cfg.data, str(tmp_path / "c"))
  assert len(maps) == 2 and desc["num_skipped"] == 1
  rows = open(tmp_path / "c" / "data_skipped.csv").read()
  assert "broken.png" in rows and "unreadable" in rows
  cfg.data.vessels = "ground_truth"
  with pytest.raises(ValueError, match="not valid"):
    data_lib.load_vessel_maps(cfg.data, None)


def test_synthetic_maps_both_vessel_modes():
  cfg = config_util.load_config("configs/teacher.py:tiny",
                                ["--config.data.synthetic.n=3"])
  gt, diam, desc = data_lib.load_vessel_maps(cfg.data, None)
  assert gt.shape == (3, 64, 64) and gt.dtype == np.uint8
  assert "synthetic" in desc["description"]
  # cropped to the FOV circle: the map side is the FOV diameter
  assert (diam > 200).all() and (diam < 280).all()
  assert 0.05 < (gt > 0).mean() < 0.4
  assert (gt[:, aug_lib.circle_mask(64) == 0] == 0).mean() > 0.97
  cfg.data.vessels = "label_free"
  cfg.data.synthetic.size = 128
  lf, _, _ = data_lib.load_vessel_maps(cfg.data, None)
  assert lf.shape == (3, 64, 64) and 0.03 < (lf > 0).mean() < 0.5
  # label-free maps agree with the ground truth where vessels are strong
  cfg.data.vessels = "ground_truth"
  gt2, _, _ = data_lib.load_vessel_maps(cfg.data, None)
  inter = ((lf > 0) & (gt2 > 0)).sum() / max((gt2 > 0).sum(), 1)
  assert inter > 0.5, inter


def test_records_processes_cover_global_batches_in_order():
  maps = np.zeros((10, 16, 16), np.uint8)
  diam = np.full(10, 16.0)
  kw = dict(seed=1, global_batch=4, process_count=2,
            aug_cfg=aug_lib.AugmentConfig(out_size=16), fov_p_max=0.5,
            fov_start=0, fov_end=1)
  r0 = data_lib.TrainRecords(maps, diam, process_index=0, **kw)
  r1 = data_lib.TrainRecords(maps, diam, process_index=1, **kw)
  for step in range(5):
    # processes stacked in order (as to_global does) = positions in order
    got = [r.global_index(step * 2 + j) for r in (r0, r1) for j in range(2)]
    assert got == list(range(step * 4, step * 4 + 4))
  # every epoch visits every map exactly once
  one = data_lib.TrainRecords(maps, diam, process_index=0,
                              **dict(kw, process_count=1))
  srcs = [int(one(i)["source"]) for i in range(20)]
  assert sorted(srcs[:10]) == list(range(10))
  assert sorted(srcs[10:]) == list(range(10)) and srcs[:10] != srcs[10:]


# --------------------------------------------------------------- training


@pytest.fixture(scope="module", autouse=True)
def _fast_compile():
  # Tiny models: XLA's optimisation passes dominate CPU compile time.
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)


def _cfg(maps_dir, *extra):
  return config_util.load_config("configs/teacher.py:tiny", [
      "--config.data.source=folder", "--config.data.vessels=precomputed",
      f"--config.data.path={maps_dir}", "--config.progress_bar=False",
      "--config.augment.fov_min_diameter_px=28", *extra])


@pytest.fixture(scope="module")
def full_run(maps_dir, tmp_path_factory):
  assert jax.device_count() == 8
  wd = str(tmp_path_factory.mktemp("full"))
  return train.train_and_evaluate(_cfg(maps_dir), wd)


def test_tiny_training_reduces_loss_and_exports(full_run):
  r = full_run
  assert r.step == r.total_steps == 8  # 4 epochs x 16 maps / batch 8
  losses = [l for _, l in r.history]
  assert np.isfinite(losses).all()
  assert losses[-1] < 0.85 * losses[0], losses
  from efiqa_jax import checkpoints
  model, meta = checkpoints.load_unet_checkpoint(r.export_dir)
  assert meta["task"] == "vuad_teacher" and meta["steps"] == 8
  assert meta["training_data"]["num_maps"] == 16
  assert meta["kwargs"]["base_channels"] == 4 and meta["kwargs"]["residual"]
  assert meta["config"]["seed"] == 36
  for a, b in zip(jax.tree.leaves(r.params),
                  jax.tree.leaves(__import__("flax").nnx.state(model))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  events = [f for f in os.listdir(r.workdir) if f.startswith("events.out")]
  assert len(events) == 1
  from efiqa_jax import metric_writers
  tags = set()
  for ev in metric_writers.read_events(os.path.join(r.workdir, events[0])):
    tags |= {v.tag for v in ev.summary.value}
  assert {"loss", "lr", "mask_ratio", "grad_norm", "masked", "output",
          "target", "anomaly"} <= tags, tags
  # metrics.jsonl: every logged step once.
  rows = metric_writers.read_metrics(r.workdir)
  assert [row["step"] for row in rows] == [2, 4, 6, 8]


def test_resume_is_bit_exact(full_run, maps_dir, tmp_path):
  wd = str(tmp_path / "resumed")
  cfg = _cfg(maps_dir)
  part = train.train_and_evaluate(cfg, wd, _stop_after_steps=5)
  assert part.step == 5 and part.export_dir is None
  # "killed" after step 5: only the step-3 checkpoint exists, steps 4-5 are
  # redone on resume. The restart goes through the CLI.
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["3"]
  from efiqa_jax import cli
  rc = cli.main(["train-teacher", "--config", "configs/teacher.py:tiny",
                 "--config.data.source=folder",
                 "--config.data.vessels=precomputed",
                 f"--config.data.path={maps_dir}",
                 "--config.augment.fov_min_diameter_px=28",
                 "--config.progress_bar=False", "--workdir", wd])
  assert rc == 0
  from efiqa_jax import checkpoints
  model, meta = checkpoints.load_unet_checkpoint(os.path.join(wd, "export"))
  assert meta["steps"] == 8
  from flax import nnx
  got = jax.tree.leaves(nnx.state(model, nnx.Param))
  want = jax.tree.leaves(full_run.params)
  assert len(got) == len(want)
  for a, b in zip(got, want):
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_sharded_matches_single_device(full_run, maps_dir, tmp_path):
  one = train.train_and_evaluate(_cfg(maps_dir, "--config.mesh.data=1"),
                                 str(tmp_path / "one"))
  # Same data, keys and init; only the reduction order of the batch mean
  # differs across 8 vs 1 device. Stated tolerance: losses rtol 1e-5, params
  # atol 1e-5 after 8 AdamW steps (updates are ~lr = 1e-3 per step).
  np.testing.assert_allclose([l for _, l in one.history],
                             [l for _, l in full_run.history], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(one.params),
                  jax.tree.leaves(full_run.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5,
                               rtol=0)


def test_nan_loss_stops_with_step(maps_dir, tmp_path):
  with pytest.raises(train.NonFiniteLossError, match=r"at step \d+"):
    train.train_and_evaluate(_cfg(maps_dir, "--config.lr=1e30"),
                             str(tmp_path / "nan"))


def test_cli_rejects_unknown_override(maps_dir, tmp_path, capsys):
  from efiqa_jax import cli
  # A typo or an unknown variant: one line, exit 2, no traceback.
  assert cli.main(["train-teacher", "--config", "configs/teacher.py:tiny",
                   "--config.not_a_key=1", "--workdir", str(tmp_path)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "unknown config key: not_a_key" in err[0], err
  assert cli.main(["train-teacher", "--config", "configs/teacher.py:huge",
                   "--workdir", str(tmp_path)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "unknown variant 'huge'" in err[0], err
  with pytest.raises(SystemExit):
    cli.main(["train-teacher", "--bogus", "--workdir", str(tmp_path)])
  with pytest.raises(SystemExit):  # a command without config overrides
    cli.main(["synth", "--config.lr=1", "--help"])


def test_cli_help_lists_every_command_verbatim():
  from efiqa_jax import cli
  text = " ".join(cli.build_parser().format_help().split())
  mods = list(cli._command_modules())  # pylint: disable=protected-access
  assert len(mods) >= 15
  for mod in mods:
    assert mod.NAME in text and " ".join(mod.HELP.split()) in text, mod.NAME
  assert "option_strings" not in text  # a bare % once pulled argparse's dict in


def test_cli_config_override_forms_are_the_same_on_every_command():
  """--set config.K=V, --config.K=V (and train-adapter's positional K=V)
  reach the config in that order; the last one wins."""
  from efiqa_jax import cli
  parser = cli.build_parser()
  for cmd, extra in [(["train-teacher"], []),
                     (["train-adapter", "--config", "configs/teacher.py:tiny"],
                      ["config.lr=0.3"]),
                     (["build-default-model", "x", "--out", "o",
                       "--config", "configs/teacher.py:tiny"], []),
                     (["distill", "x", "--teacher", "t", "--encoder", "e",
                       "--config", "configs/teacher.py:tiny"], []),
                     (["pretrain-encoder", "x", "--out", "o",
                       "--config", "configs/teacher.py:tiny"], [])]:
    argv = cmd + ["--workdir", "w"] * (cmd[0] != "pretrain-encoder") + [
        "--set", "config.lr=0.1", "--set", "config.seed=7"] + extra
    args, rest = parser.parse_known_args(argv + ["--config.batch_size=4"])
    assert args.config_overrides_ok and rest == ["--config.batch_size=4"]
    args.config_overrides = rest
    if cmd[0] == "train-teacher":
      args.config = "configs/teacher.py:tiny"
    cfg = config_util.config_from_args(
        args, getattr(args, "positional_overrides", ()))
    assert cfg.seed == 7 and cfg.batch_size == 4, cmd[0]
    assert cfg.lr == (0.3 if cmd[0] == "train-adapter" else 0.1), cmd[0]


def test_fsdp_resumes_bit_exactly_and_matches_replicated(full_run, maps_dir,
                                                        tmp_path):
  """fsdp 4 x data 2 on 8 devices: parameters and their Adam moments are
  sharded; a killed run resumes bit for bit; the losses and parameters
  agree with the replicated run within float tolerance."""
  import orbax.checkpoint as ocp
  over = ["--config.mesh.fsdp=4", "--config.mesh.data=2",
          "--config.sharding.params=[('.*', 'fsdp(min_mb=0)')]"]
  full = train.train_and_evaluate(
      _cfg(maps_dir, *over, "--config.profile_steps=1:2"),
      str(tmp_path / "a"))
  # The saved state is FSDP-sharded, moments like their parameters.
  meta = ocp.StandardCheckpointer().metadata(
      tmp_path / "a" / "checkpoints" / "8" / "state")
  tree = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
  specs = {}
  for path, m in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = "/".join(str(getattr(k, "key", getattr(k, "idx", k)))
                    for k in path).removesuffix("/value")
    specs[name] = str(getattr(m.sharding, "partition_spec", m.sharding))
  kernel = [n for n in specs if n.startswith("params/") and "kernel" in n]
  assert kernel and all("fsdp" in specs[n] for n in kernel), specs
  mu = [n for n in specs if "/mu/" in n and n.endswith("kernel")]
  assert mu and all("fsdp" in specs[n] for n in mu)
  # --profile-steps: a trace of those steps.
  assert any(files for _, _, files in os.walk(tmp_path / "a" / "profile"))
  part = train.train_and_evaluate(_cfg(maps_dir, *over), str(tmp_path / "b"),
                                  _stop_after_steps=5)
  assert part.step == 5
  resumed = train.train_and_evaluate(_cfg(maps_dir, *over),
                                     str(tmp_path / "b"))
  assert resumed.step == 8
  for a, b in zip(jax.tree.leaves(resumed.params),
                  jax.tree.leaves(full.params)):
    assert np.array_equal(np.asarray(a), np.asarray(b))
  # Replicated vs FSDP: the same computation, reductions ordered
  # differently. Stated tolerance: losses rtol 1e-5, params atol 1e-5.
  np.testing.assert_allclose([l for _, l in full.history],
                             [l for _, l in full_run.history], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(full.params),
                  jax.tree.leaves(full_run.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5,
                               rtol=0)


def test_changed_config_is_refused_with_the_difference(full_run, maps_dir,
                                                       capsys):
  from efiqa_jax import cli
  rc = cli.main(_cli_args(maps_dir, full_run.workdir, "--config.lr=0.01",
                          "--config.log_every=1"))
  assert rc == 2
  err = [l for l in capsys.readouterr().err.splitlines() if "error" in l]
  # One line; log_every does not change results: only lr is named.
  assert len(err) == 1, err
  assert err[0].startswith("efiqa train-teacher: error: ")
  assert "settings: lr 0.001 -> 0.01 (resume needs the same config" in err[0]


def test_rerun_of_a_finished_run_reports_its_final_loss(full_run, maps_dir,
                                                        capsys):
  """A rerun trains nothing and printed "final loss nan"."""
  from efiqa_jax import cli
  assert cli.main(_cli_args(maps_dir, full_run.workdir)) == 0
  out = capsys.readouterr().out
  assert f"trained 8/8 steps; final loss {full_run.history[-1][1]:.5g};" in out


def _cli_args(maps_dir, workdir, *extra):
  return ["train-teacher", "--config", "configs/teacher.py:tiny",
          "--config.data.source=folder", "--config.data.vessels=precomputed",
          f"--config.data.path={maps_dir}",
          "--config.augment.fov_min_diameter_px=28",
          "--config.progress_bar=False", *extra, "--workdir", str(workdir)]


def test_ctrl_c_then_sigterm_then_rerun_resumes_bit_exactly(maps_dir,
                                                            tmp_path):
  """`efiqa train-teacher` gets Ctrl-C while it compiles: it finishes the
  compilation (no SIGSEGV, no hang), says in one line that nothing was
  saved and exits 130. Rerun, it gets SIGTERM mid-run: it saves a
  checkpoint at the step it reached, says so in one line and exits 75; the
  same command resumes and ends bit for bit where an uninterrupted run
  ends."""
  over = ["--config.num_epochs=20", "--config.checkpoint_every=5",
          "--config.log_every=5", "--config.image_every=0"]
  wd = tmp_path / "sig"
  # Uncached: the signal must arrive while XLA compiles.
  p = multihost.start_efiqa(_cli_args(maps_dir, wd, *over),
                            compile_cache=False)
  # Logged once the handlers are in place, before the init and step
  # compilations (seconds of XLA work even for the tiny U-Net).
  multihost.wait_for(lambda: "trainable parameters" in multihost.log(p), p,
                     600, "train-teacher")
  p.send_signal(signal.SIGINT)
  rc, log = multihost.finish(p, 300, "train-teacher after Ctrl-C")
  assert rc == 130, log[-3000:]
  stops = [l for l in log.splitlines() if "stopped by" in l]
  assert len(stops) == 1 and stops[0].startswith("efiqa train-teacher: "), log
  assert stops[0].endswith(
      "stopped by SIGINT before the first step; nothing to save"), stops
  assert "Traceback" not in log and not multihost.checkpoint_steps(wd)
  # Interrupted, resumed and reference runs are the same command in fresh
  # processes compiled alike (fully optimised, no persistent cache): an
  # in-process reference compiled under other settings differed in the
  # last bits on CI.
  def run(workdir):
    return multihost.start_efiqa(_cli_args(maps_dir, workdir, *over),
                                 fast_compile=False, compile_cache=False)
  p = run(wd)
  multihost.wait_for(lambda: multihost.checkpoint_steps(wd), p, 900,
                     "train-teacher")
  p.send_signal(signal.SIGTERM)
  rc, log = multihost.finish(p, 300, "train-teacher after SIGTERM")
  assert rc == 75, log[-3000:]
  stopped = multihost.checkpoint_steps(wd)[-1]
  assert 5 <= stopped < 40
  assert (f"stopped by SIGTERM after step {stopped}/40; checkpoint "
          f"{stopped} saved, rerun the same command to resume") in log
  assert "Traceback" not in log and not (wd / "export").exists()
  resumed, reference = run(wd), run(tmp_path / "ref")
  for proc, what in ((resumed, "resumed"), (reference, "reference")):
    rc, log = multihost.finish(proc, 900, f"train-teacher {what}")
    assert rc == 0, log[-3000:]
  assert f"resumed at step {stopped}/40" in multihost.log(resumed)
  from efiqa_jax import checkpoints
  from efiqa_jax import metric_writers
  from flax import nnx
  model, meta = checkpoints.load_unet_checkpoint(wd / "export")
  ref, _ = checkpoints.load_unet_checkpoint(tmp_path / "ref" / "export")
  assert meta["steps"] == 40
  for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)),
                  jax.tree.leaves(nnx.state(ref, nnx.Param))):
    assert np.array_equal(np.asarray(a), np.asarray(b))
  steps = [r["step"] for r in metric_writers.read_metrics(wd)]
  assert steps == list(range(5, 41, 5))  # each logged step once


# ------------------------------------------------------------- multi-host


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_started_by_flags_killed_and_rerun(maps_dir, tmp_path):
  """`efiqa --coordinator-address ... --num-processes 2 --process-id i
  train-teacher` on 2 processes x 2 devices: hard-killed after a
  checkpoint, rerun to the end; complete, exactly-once outputs, the same
  parameters as one process on the same 4-device mesh."""
  from efiqa_jax import checkpoints
  from efiqa_jax import metric_writers
  from flax import nnx
  wd = tmp_path / "mp"
  over = ["--config.num_epochs=10", "--config.checkpoint_every=5",
          "--config.log_every=5", "--config.image_every=10"]
  args = _cli_args(maps_dir, wd, *over)
  res, killed = multihost.run_efiqa(
      lambda i: args, 2, timeout=1800, what="2-process train-teacher",
      kill_when=lambda: 5 in multihost.checkpoint_steps(wd))
  assert killed and not (wd / "export").exists(), res[0][1][-2000:]
  res, _ = multihost.run_efiqa(lambda i: args, 2, timeout=1800,
                               what="2-process train-teacher rerun")
  for i, (_, log) in enumerate(res):
    assert log.count(f"process {i}/2 (flags): 2 local devices, 4 global") == 1
  assert "trained 20/20 steps" in res[0][1]
  assert "trained 20/20" not in res[1][1]  # one process reports
  assert [r["step"] for r in metric_writers.read_metrics(wd)] == list(
      range(5, 21, 5))
  model, meta = checkpoints.load_unet_checkpoint(wd / "export")
  assert meta["steps"] == 20
  one = train.train_and_evaluate(_cfg(maps_dir, "--config.mesh.data=4",
                                      *over), str(tmp_path / "one"))
  # Same mesh shape and data; cross-process reductions (gloo) may order
  # sums differently, and AdamW scales each update to ~lr (1e-3) whatever
  # the gradient, so a last-bit difference in a near-zero gradient moves a
  # weight by a fraction of one step: 1.08e-5 after a 30-step run on an
  # AMD EPYC (CI, 2026-12-04). atol 1e-4, a tenth of one step; a wrong
  # batch, share or step count moves weights by whole steps.
  for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)),
                  jax.tree.leaves(one.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4,
                               rtol=0)
