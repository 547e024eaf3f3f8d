"""efiqa_jax: label-free, explainable fundus image quality assessment.

Data flows one way, and each stage lives in one module:
photograph -> FOV crop (`fundus`) -> vessel map (`vessels`) -> teacher
(`teacher`) -> pseudo-labels (`pseudo_labels`) -> encoder features ->
adapter -> map, score, report (`assess`).
"""

__version__ = "0.1.0"



def _configure_storage(environ=None) -> None:
  """gs:// through gcsfs rather than tf.io.gfile, and tensorstore to the same
  emulator; decided before any module touches a remote path. See
  `efiqa_jax.files` (kept here so that `import efiqa_jax` stays light)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  environ = os.environ if environ is None else environ
  if importlib.util.find_spec("gcsfs") is not None:
    environ.setdefault("EPATH_USE_TF", "false")
  emulator = environ.get("STORAGE_EMULATOR_HOST")
  if emulator:
    if "://" not in emulator:
      emulator = "http://" + emulator
    environ.setdefault("TENSORSTORE_GCS_HTTP_URL", emulator)


_configure_storage()
