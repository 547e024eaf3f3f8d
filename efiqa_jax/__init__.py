"""efiqa_jax: label-free, explainable fundus image quality assessment.

Data flows one way, and each stage lives in one module:
photograph -> FOV crop (`fundus`) -> vessel map (`vessels`) -> teacher
(`teacher`) -> pseudo-labels (`pseudo_labels`) -> encoder features ->
adapter -> map, score, report (`assess`).
"""

__version__ = "0.1.0"

import os as _os

# gs:// through gcsfs, not tf.io.gfile (TensorFlow is importable here); set
# before any module touches a remote path. See `efiqa_jax.files`.
_os.environ.setdefault("EPATH_USE_TF", "false")
