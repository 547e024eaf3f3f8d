"""efiqa_jax.reference (the PyTorch models tests and bench/ compare against)
is importable without the `port` extra: only its modules need torch."""
import os
import subprocess
import sys


def test_package_import_does_not_need_torch(repo_root):
  code = ("import sys, efiqa_jax.reference; "
          "assert 'torch' not in sys.modules and "
          "'transformers' not in sys.modules, sorted(sys.modules)")
  subprocess.run([sys.executable, "-c", code], cwd=repo_root, check=True,
                 env=dict(os.environ, PYTHONPATH=str(repo_root)), timeout=120)
