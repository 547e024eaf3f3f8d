"""Runs a notebook in colabs/ top to bottom as a Colab user would: in a
fresh virtualenv (tests/fresh_install.py) whose kernel starts without
efiqa-jax, so the notebook's own install cell installs it, here from the
wheel of the checkout (EFIQA_INSTALL), with the tested versions
(PIP_CONSTRAINT=constraints.txt). One venv serves the whole test run; the
install cells of notebooks running in parallel take turns (a file lock),
and the later ones find what they need installed and skip."""
import base64
import os
import pathlib
import subprocess

import pytest

from tests import fresh_install

KERNEL = "efiqa-fresh"


def _kernelspec(venv: pathlib.Path) -> pathlib.Path:
  """A kernelspec for the venv's python (found through JUPYTER_PATH)."""
  share = venv / "share" / "jupyter"
  if not (share / "kernels" / KERNEL).is_dir():
    with fresh_install._locked(venv.parent / "kernelspec.lock"):  # pylint: disable=protected-access
      if not (share / "kernels" / KERNEL).is_dir():
        subprocess.run([str(fresh_install.venv_python(venv)), "-m",
                        "ipykernel", "install", "--prefix", str(venv),
                        "--name", KERNEL], check=True, capture_output=True)
  return share


def run_notebook(name, tmp_path, monkeypatch, *, venv, wheel, env=None,
                 timeout=900, install_timeout=1800):
  """Executes colabs/<name> with cwd=tmp_path in `venv`'s kernel.

  Returns (text of all stream outputs, list of PNG byte strings). Fails on
  any cell error. The kernel's environment is the venv's (no PYTHONPATH:
  nothing of the checkout leaks in; no fake XLA devices) plus `env`.
  `timeout` is per cell; the install cell has `install_timeout` (the first
  one installs jax, scipy, ... and, for the port notebook, torch)."""
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  nb = nbformat.read(str(fresh_install.REPO / "colabs" / name), as_version=4)
  share = _kernelspec(pathlib.Path(venv))
  kernel_env = fresh_install.pip_env(venv)
  kernel_env.pop("XLA_FLAGS", None)
  kernel_env.pop("MPLBACKEND", None)  # the inline backend
  kernel_env["EFIQA_INSTALL"] = str(wheel)
  kernel_env["PIP_NO_COMPILE"] = "1"  # bytecode is compiled on import
  kernel_env["JUPYTER_PATH"] = str(share)
  for k, v in (env or {}).items():
    if v is None:
      kernel_env.pop(k, None)
    else:
      kernel_env[k] = v
  # The kernelspec lookup happens in this process.
  monkeypatch.setenv("JUPYTER_PATH", str(share))
  client = nbclient.NotebookClient(
      nb, kernel_name=KERNEL, timeout=timeout,
      resources={"metadata": {"path": str(tmp_path)}})
  lock = pathlib.Path(venv).parent / "install-cell.lock"
  client.reset_execution_trackers()
  with client.setup_kernel(env=kernel_env, cwd=str(tmp_path)):
    for index, cell in enumerate(nb.cells):
      run = lambda c=cell, i=index: client.execute_cell(  # noqa: E731
          c, i, execution_count=client.code_cells_executed + 1)
      if "install" in cell.metadata.get("tags", []):
        with fresh_install._locked(lock):  # pylint: disable=protected-access
          client.timeout = install_timeout
          run()
          client.timeout = timeout
      else:
        run()
  outputs = [o for c in nb.cells if c.cell_type == "code"
             for o in c.get("outputs", [])]
  errors = [o for o in outputs if o.get("output_type") == "error"]
  assert not errors, errors
  text = "".join(o.get("text", "") for o in outputs)
  for o in outputs:
    text += o.get("data", {}).get("text/plain", "")
  pngs = [base64.b64decode(o["data"]["image/png"]) for o in outputs
          if "image/png" in o.get("data", {})]
  htmls = [o["data"]["text/html"] for o in outputs
           if "text/html" in o.get("data", {})]
  return text, pngs, htmls
