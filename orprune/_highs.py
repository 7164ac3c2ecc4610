"""A silent HiGHS instance.

``output_flag=False`` silences every solve, but highspy >= 1.16 prints its banner
("Running HiGHS ...") while the ``Highs`` object is being constructed, before any option can be
set, and it writes from C straight to file descriptor 1, past ``sys.stdout``. Library code must
not write to the user's stdout, so the constructor runs with descriptor 1 pointed at the null
device for those few microseconds.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["quiet_highs"]


def _flush_c_stdio() -> None:
    try:
        ctypes.CDLL(None).fflush(None)  # C's buffered stdout, e.g. when stdout is a pipe
    except (OSError, AttributeError, TypeError):  # no process-wide C library handle (Windows)
        pass


@contextmanager
def _descriptor_1_silenced() -> Iterator[None]:
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError, AttributeError):  # no descriptor 1 to redirect: nothing to hide
        yield
        return
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    try:
        yield
    finally:
        _flush_c_stdio()
        os.dup2(saved, 1)
        os.close(saved)
        os.close(null)


def quiet_highs() -> Any:
    """``highspy.Highs()`` with ``output_flag`` off and nothing printed while it is built."""
    import highspy

    with _descriptor_1_silenced():
        highs = highspy.Highs()
    highs.setOptionValue("output_flag", False)
    return highs
