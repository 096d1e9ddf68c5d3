"""``python -m surgery`` (and ``torchrun -m surgery``): the command line."""

import sys

from .cli import main

sys.exit(main())
