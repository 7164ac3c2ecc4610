"""``python -m orprune.cli``: the same as the ``orprune`` command."""

import sys

from orprune.cli import main

if __name__ == "__main__":
    sys.exit(main())
