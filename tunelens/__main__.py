import sys

from tunelens.cli import main

sys.exit(main())
