"""efiqa-jax: label-free, explainable fundus image quality assessment in JAX/Flax.

The pins below are the version set the test suite runs on (CI installs exactly
these). Loosen them only together with a green CI run.
"""
import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _version():
  with open(os.path.join(HERE, "efiqa_jax", "__init__.py")) as f:
    return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


CORE = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "tensorflow-datasets==4.9.10",
    "array-record==0.8.6",
    # tensorflow-datasets 4.9.10 imports importlib_resources when a builder
    # lives in a package (DatasetBuilder.code_path) but only declares it for
    # Python < 3.9; without it every data/ builder fails to prepare.
    "importlib-resources==7.1.0",
    # clu's TensorBoard writer and the TFDS builders need TensorFlow; the
    # CPU wheel is enough (TF never touches the accelerator here).
    "tensorflow-cpu==2.21.0",
    "tensorboard==2.21.0",  # efiqa_jax.metric_writers' event files; tensorflow-cpu does not pull it in
    "ml-collections==1.1.0",
    "clu==0.0.12",
    "numpy==2.4.6",
    "pillow==13.0.0",
    "scipy==1.17.1",
    "scikit-image==0.26.0",
    "tqdm==4.70.1",
    "matplotlib==3.11.2",
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

TEST = PORT + DICOM + [
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
    packages=find_packages(include=["efiqa_jax", "efiqa_jax.*"]),
    package_data={"efiqa_jax": ["assets/*", "assets/**/*"]},
    include_package_data=True,
    install_requires=CORE,
    extras_require={"port": PORT, "dicom": DICOM, "test": TEST},
    entry_points={"console_scripts": ["efiqa=efiqa_jax.cli:main"]},
)
