"""tunelens: what supervised fine-tuning did inside a model.

``import tunelens as tl`` gives the public API: the analyses over (base, tuned, data)
(``tl.weight_deltas``, ``tl.cka_matrix``, ``tl.attribute``, ``tl.rewind``, ...), safe loading of
checkpoints (``tl.load_model``), data (``tl.image_folder``) and the whole suite
(``tl.analyze_models``). Every function that compares two models takes ``(base, tuned, data, *,
device=None, ...)`` and never moves or changes the caller's models. Sub-packages:
``tunelens.core`` (shared runtime), ``tunelens.finetune``, ``tunelens.analysis``, ``tunelens.reports``.
"""

import os as _os

# OpenMP threads that sleep when idle instead of spinning: on a busy 2-core machine two spinning torch threads
# made a training step 3x slower than one thread (bench/threads.py); set before torch starts OpenMP. An explicit
# OMP_WAIT_POLICY in the environment wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

from tunelens.analysis import *  # noqa: F403 - the public API is analysis's __all__ plus the names below
from tunelens.analysis import __all__ as _analysis_all
from tunelens.analysis.suite import analyze_models
from tunelens.core.runtime import resolve_device

try:
    __version__ = _version("tunelens")
except PackageNotFoundError:  # pragma: no cover - running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = [*_analysis_all, "__version__", "analyze_models", "resolve_device"]
