"""``python -m tunelens.base_weights [DIR]`` (``make base-weights``): pretrain the default run's base from scratch
and write it to ``finetune/shipped/`` (or DIR) with its keys; see :mod:`tunelens.finetune.shipped`."""

from __future__ import annotations

import sys
from pathlib import Path

from tunelens.config import make_config
from tunelens.finetune.recipes import make_shipped_base
from tunelens.finetune.shipped import SHIPPED

if __name__ == "__main__":
    make_shipped_base(
        make_config(None, sets=["pretrain.use_shipped=false"]),
        Path(sys.argv[1]) if len(sys.argv) > 1 else SHIPPED.parent,
    )
