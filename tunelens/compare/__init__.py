"""``tunelens compare``: the analysis and report stages on checkpoints that tunelens did not train.

    tunelens compare --arch resnet50 --base pretrained.pt --tuned finetuned.pt --data images/ --out cmp/

Every input is checked before anything is written to ``--out`` (files, architecture and keys,
the tuned heads against the data folder's classes, a forward pass on the images); a bad input
exits with status 2 and one line on stderr. The results folder and the report are each
swapped into place only when complete, so an existing report is replaced only by a whole one.

Modules, in the order of the validation: ``flags`` (the parser, flag and --out checks), ``settings`` (the
configuration), ``checkpoints`` (architecture, checkpoints, adapters), ``data`` (images), ``smoke`` (a forward
pass), ``manifests`` (what the report says about the inputs), ``validation`` (the whole order), ``text`` (the
same for ``--arch hf:...``); ``plan`` (what was validated), ``execution`` (the run and the command).
Part of the composition layer: may import ``tunelens.analysis``, ``tunelens.reports``, ``tunelens.core``,
``tunelens.config`` and ``tunelens.flags``.
"""

from tunelens.compare.execution import execute, main, run
from tunelens.compare.flags import add_parser
from tunelens.compare.manifests import external_manifests
from tunelens.compare.plan import CompareError, Plan
from tunelens.compare.validation import validate

__all__ = ["CompareError", "Plan", "add_parser", "execute", "external_manifests", "main", "run", "validate"]
