"""What a non-editable install gets: every library file, asset and config;
exact pins in constraints.txt; every architecture in the explicit registry."""
import ast
import email.parser
import os
import re
import subprocess
import sys
import zipfile

import pytest

from efiqa_jax import checkpoints
from efiqa_jax import registry
from tests import fresh_install


def test_wheel_holds_every_library_file_asset_and_config(efiqa_wheel):
  names = set(zipfile.ZipFile(efiqa_wheel).namelist())
  want = set()
  for f in fresh_install.source_files():
    parts = f.split("/")
    if "__pycache__" in parts or f.endswith(".pyc"):
      continue
    if parts[0] == "efiqa_jax":
      want.add(f)
    elif parts[0] == "configs" and f.endswith(".py"):
      want.add("efiqa_jax/configs/" + "/".join(parts[1:]))
  assert "efiqa_jax/teacher/train.py" in want  # the folder that went missing
  assert "efiqa_jax/assets/teacher_default/efiqa.json" in want
  assert "efiqa_jax/configs/teacher.py" in want
  assert not want - names, sorted(want - names)
  # Every package folder is a package (find_packages skips the others).
  pkgs = {os.path.dirname(f) for f in want if f.endswith(".py")}
  assert {p for p in pkgs if p + "/__init__.py" not in names} == set()


def test_core_requirements_have_no_tensorflow(efiqa_wheel):
  z = zipfile.ZipFile(efiqa_wheel)
  meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
  reqs = email.parser.Parser().parsestr(
      z.read(meta).decode()).get_all("Requires-Dist")
  core = [r for r in reqs if "extra ==" not in r]
  assert core and not [r for r in core if r.lower().startswith(
      ("tensorflow-cpu", "tensorflow ", "tensorflow>", "tensorboard"))]
  assert any(r.startswith("tensorflow-cpu") and "extra == \"tf\"" in r
             for r in reqs)
  # Ranges, not exact pins: a compatible preinstalled jax/numpy is kept.
  assert not [r for r in core if "==" in r], core


def test_constraints_list_every_pin_of_setup(repo_root):
  text = (repo_root / "setup.py").read_text()
  pins = set(re.findall(r'"([A-Za-z0-9_.\-]+==[0-9][^"]*)"', text))
  listed = {ln.strip() for ln in (repo_root / "constraints.txt").read_text()
            .splitlines() if ln.strip() and not ln.startswith("#")}
  assert pins and pins == listed


def _arch_names_in_library(repo_root):
  """`ARCH = "name"` class attributes anywhere in efiqa_jax/."""
  found = {}
  for path in (repo_root / "efiqa_jax").rglob("*.py"):
    tree = ast.parse(path.read_text())
    for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
      for st in cls.body:
        if (isinstance(st, ast.Assign) and len(st.targets) == 1
            and getattr(st.targets[0], "id", None) == "ARCH"
            and isinstance(st.value, ast.Constant)
            and st.value.value is not None):  # None: not saveable (kernels)
          mod = ".".join(path.relative_to(repo_root).with_suffix("").parts)
          found[st.value.value] = f"{mod}:{cls.name}"
  return found


def test_registry_lists_every_architecture_explicitly(repo_root):
  found = _arch_names_in_library(repo_root)
  assert {"unet", "vit", "adapter_linear", "eyeq_head"} <= set(found)
  assert found == {k: v.factory for k, v in registry.ARCHITECTURES.items()}
  for a in registry.ARCHITECTURES.values():
    assert a.kind in registry.KINDS
  # No registration as an import side effect anywhere in the library.
  for path in (repo_root / "efiqa_jax").rglob("*.py"):
    if path.name not in ("registry.py", "checkpoints.py"):
      assert "register_architecture(" not in path.read_text(), path


def test_adapter_loads_in_a_fresh_process(tmp_path, repo_root):
  """`efiqa train-eyeq-head --adapter DIR` failed with "unknown architecture
  'adapter_linear'" unless something had imported the adapters module."""
  from flax import nnx
  from efiqa_jax.models import adapters
  checkpoints.save_model(tmp_path / "ada",
                         adapters.LinearAdapter(8, rngs=nnx.Rngs(0)))
  code = ("import sys; from efiqa_jax import checkpoints; "
          "m, meta = checkpoints.load_model(sys.argv[1], kind='adapter'); "
          "print(type(m).__name__)")
  env = dict(os.environ, PYTHONPATH=str(repo_root))
  out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ada")],
                       env=env, capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "LinearAdapter"


def test_wrong_kind_of_model_directory_is_one_line(tmp_path, capsys):
  from flax import nnx
  from efiqa_jax import cli
  from efiqa_jax.models import vit
  enc = tmp_path / "enc"
  checkpoints.save_model(enc, vit.VisionTransformer(
      patch_size=16, hidden_size=16, depth=1, num_heads=2, mlp_hidden=32,
      rngs=nnx.Rngs(0)))
  photo = tmp_path / "x.png"
  photo.write_bytes(b"not read")
  rc = cli.main(["assess", str(photo), "--out", str(tmp_path / "o"),
                 "--model", str(enc), "--quiet"])
  err = capsys.readouterr().err.strip()
  assert rc == 2
  assert len(err.splitlines()) == 1, err
  assert "holds a ViT encoder (architecture 'vit')" in err
  assert "expected a teacher model" in err and "--model student" in err
  with pytest.raises(ValueError, match="expected an adapter"):
    checkpoints.load_model(enc, kind="adapter")
