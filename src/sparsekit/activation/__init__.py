"""Training-free activation sparsity: skip the weight columns of small layer inputs.

:func:`calibrate` finds per-layer thresholds on calibration data (TEAL, WINA or CATS scores;
uniform or greedy allocation), :class:`ActivationSparsity` installs them as forward
pre-hooks, :func:`profile` shows how sparse the inputs already are, and
``sparsekit.compile(model, activation_sparsity=...)`` turns the thresholded layers into
:class:`~sparsekit.engine.activation_linear.ActivationSparseLinear` modules whose batch-1
kernel reads only the weight columns of the inputs that are left.
"""

from sparsekit.activation.calibrate import calibrate
from sparsekit.activation.profile import LayerProfile, profile
from sparsekit.activation.scores import METHODS, score
from sparsekit.activation.sparsity import ActivationSparsity

__all__ = ["METHODS", "ActivationSparsity", "LayerProfile", "calibrate", "profile", "score"]
