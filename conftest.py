"""Repository-wide pytest configuration.

The notebooks read ``ORPRUNE_NOTEBOOK_SMALL``: under pytest they run on small settings unless the
caller sets it to "0". Their kernels inherit this process's environment.
"""

import os

os.environ.setdefault("ORPRUNE_NOTEBOOK_SMALL", "1")
