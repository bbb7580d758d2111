"""``python -m tunelens`` (and ``torchrun -m tunelens``).

Python puts the working directory first on ``sys.path`` for ``-m``: a user's ``analysis.py`` or
``finetune/`` there would shadow or be run in place of modules. It is removed before anything
else of tunelens is imported; ``--arch module:function`` imports its factory from the working
directory explicitly (and only for that import).
"""

import os
import sys


def _drop_working_directory() -> None:
    try:
        cwd = os.path.realpath(os.getcwd())
    except OSError:  # the working directory was removed
        cwd = None
    if sys.path and (sys.path[0] in ("", ".") or (cwd is not None and os.path.realpath(sys.path[0]) == cwd)):
        del sys.path[0]
    sys.path[:] = [p for p in sys.path if p not in ("", ".")]


_drop_working_directory()

from tunelens.cli import main  # noqa: E402

sys.exit(main())
