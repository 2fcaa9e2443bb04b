"""``python -m pgjournal``: the same as the ``pgjournal`` console script."""

import sys

from .cli import main

sys.exit(main())
