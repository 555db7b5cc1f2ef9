"""Triton entry point: the adapter is ``serving/triton_model.py`` (shared by both EasyAnimate models).

The stub runs Python in isolated mode (PYTHONPATH ignored); when ``serving`` is not installed in its environment,
the launcher names the source checkout in ``EASYANIMATE_PYTHONPATH``.
"""

import os
import sys

_ROOT = os.environ.get("EASYANIMATE_PYTHONPATH")
if _ROOT and _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from serving.triton_model import TritonPythonModel  # noqa: E402,F401
