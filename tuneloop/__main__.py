"""``python -m tuneloop``: the same as the ``tuneloop`` command."""

import sys

from tuneloop.cli import main

sys.exit(main())
