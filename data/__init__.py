"""TFDS builders for the datasets efiqa-jax trains and evaluates on.

Each dataset lives in `data/<name>/<name>_dataset_builder.py` (the TFDS CLI
layout), so `tfds build data/<name> --manual_dir=... --file_format=array_record`
works from the repository root. Tests import them as `data.<name>.<name>_dataset_builder`
with the repository root on sys.path. See data/README.md.
"""
