"""efiqa-jax: label-free, explainable fundus image quality assessment in JAX/Flax.

Each `name==X` below is the version the test suite runs on. The package asks
for `>=X` below the next minor (0.x) or major release (`compatible`), so that
an environment that already has a compatible jax, numpy or torch (Colab, a
GPU/TPU image) keeps it; CI and the README's test command install exactly the
tested set through constraints.txt (tests/test_packaging.py checks that it
lists every pin here). Raise a pin only together with a green CI run.
"""
import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def compatible(pin: str) -> str:
  """'jax==0.10.2' -> 'jax>=0.10.2,<0.11'; 'numpy==2.4.6' -> 'numpy>=2.4.6,<3'."""
  name, version = pin.split("==")
  major, minor = (int(x) for x in version.split(".")[:2])
  upper = f"0.{minor + 1}" if major == 0 else str(major + 1)
  return f"{name}>={version},<{upper}"


def _version():
  with open(os.path.join(HERE, "efiqa_jax", "__init__.py")) as f:
    return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


# The core install: everything `efiqa assess`, the trainers and the student
# need, and no TensorFlow (TF was 1.3 GB of a 2.6 GB virtualenv and `assess`
# never used it). What needs TF is in the `tf` extra below.
CORE = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    # Builds (data/build.py) and reads (`tfds:NAME` inputs, tfds.data_source)
    # the ArrayRecord TFDS datasets; 4.9.10 does both without TensorFlow.
    "tensorflow-datasets==4.9.10",
    "array-record==0.8.6",
    # tensorflow-datasets 4.9.10 imports importlib_resources when a builder
    # lives in a package (DatasetBuilder.code_path) but only declares it for
    # Python < 3.9; without it every data/ builder fails to prepare.
    "importlib-resources==7.1.0",
    "ml-collections==1.1.0",
    # Metrics and writers; without TensorFlow the trainers write
    # WORKDIR/metrics.jsonl and panels/*.png instead of TensorBoard events.
    "clu==0.0.12",
    "numpy==2.4.6",
    "pillow==13.0.0",
    "scipy==1.17.1",
    "scikit-image==0.26.0",
    "tqdm==4.70.1",
    "matplotlib==3.11.2",
]

# TensorFlow: only for TensorBoard event files from the trainers (clu's
# writer; without it they write metrics.jsonl and panels/*.png). The CPU
# wheel is enough (TF never touches the accelerator here).
TF = [
    "tensorflow-cpu==2.21.0",
    "tensorboard==2.21.0",  # clu's writer imports it; tensorflow-cpu does not pull it in
]

PORT = [
    # A CPU build of torch is all porting and parity need; an unpinned torch
    # pulls a multi-GB CUDA build.
    "torch==2.13.0",
    "transformers==5.24.0",
    "safetensors==0.8.0",
    # timm needs torchvision, which has no build beside torch 2.13.0 here:
    # timm-format checkpoints are read as plain state dicts, without timm.
]

DICOM = ["pydicom==3.0.2"]

TEST = TF + PORT + DICOM + [
    "pytest==9.2.0",
    "pytest-xdist==3.8.0",
    "nbclient==0.11.0",
    "nbformat==5.11.1",
    "ipykernel==7.4.0",
]

setup(
    name="efiqa-jax",
    version=_version(),
    description=("Label-free, explainable fundus image quality assessment "
                 "(EFIQA) in JAX/Flax"),
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11",
    # configs/ (the repository's bundled configs) is installed as
    # efiqa_jax.configs, so `--config teacher:tiny` works from any install.
    packages=(find_packages(include=["efiqa_jax", "efiqa_jax.*"])
              + ["efiqa_jax.configs"]),
    package_dir={"efiqa_jax.configs": "configs"},
    package_data={"efiqa_jax": ["assets/*", "assets/**/*"]},
    include_package_data=True,
    install_requires=[compatible(p) for p in CORE],
    extras_require={k: [compatible(p) for p in v] for k, v in (
        ("tf", TF), ("port", PORT), ("dicom", DICOM), ("test", TEST))},
    entry_points={"console_scripts": ["efiqa=efiqa_jax.cli:main"]},
)
