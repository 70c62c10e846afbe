"""``python -m pyshmfeed``: the same command line as the ``pyshmfeed`` script."""

import sys

from .cli import main

sys.exit(main())
