"""Builds one of the data/ datasets in ArrayRecord format.

  python -m data.build drimdb --config=all --manual_dir=/path/to/DRIMDB \
      --data_dir=~/tensorflow_datasets

(run from the repository root). Equivalent to
`tfds build data/<name> --manual_dir=... --file_format=array_record`, but
the `tfds` CLI of tensorflow-datasets 4.9.10 imports apache_beam at start-up
(scripts/cli/convert_format_utils.py), which efiqa-jax does not install.
"""
from __future__ import annotations

import argparse
import importlib
import os
import pathlib
import sys

NAMES = ("drimdb", "drive", "efiqa_synth", "eyeq", "funpiq", "mbrset",
         "messidor2", "mshf")


def build(name: str, manual_dir: str, data_dir: str | None = None,
          config: str | None = None):
  """download_and_prepare in ArrayRecord format; returns the builder."""
  import tensorflow_datasets as tfds
  if name not in NAMES:
    raise ValueError(f"unknown dataset {name!r}; choose from {NAMES}")
  module = importlib.import_module(f"data.{name}.{name}_dataset_builder")
  data_dir = os.path.expanduser(data_dir) if data_dir else None
  builder = module.Builder(data_dir=data_dir, config=config)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          manual_dir=os.path.expanduser(manual_dir)),
      file_format="array_record")
  return builder


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("name", choices=NAMES)
  p.add_argument("--manual_dir", required=True)
  p.add_argument("--data_dir", default=None,
                 help="TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
  p.add_argument("--config", default=None)
  args = p.parse_args(argv)
  repo = str(pathlib.Path(__file__).resolve().parents[1])
  if repo not in sys.path:
    sys.path.insert(0, repo)
  builder = build(args.name, args.manual_dir, args.data_dir, args.config)
  for split, info in builder.info.splits.items():
    print(f"{builder.info.full_name} {split}: {info.num_examples} examples "
          f"in {builder.data_dir}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
