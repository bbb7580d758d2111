"""``python -m tunelens.compare ...`` (the same as ``tunelens compare ...``)."""

import sys

from tunelens.compare.execution import main

sys.exit(main())
