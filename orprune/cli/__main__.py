"""``python -m orprune.cli``: the same as the ``orprune`` command."""

import sys

from orprune.cli import main

sys.exit(main())
