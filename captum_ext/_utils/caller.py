"""Where a warning raised inside the package should point: the user's own line."""

from __future__ import annotations

import os
import sys

import captum

_PACKAGES = (os.path.dirname(os.path.dirname(__file__)), os.path.dirname(captum.__file__))


def user_stacklevel() -> int:
    """``stacklevel`` for ``warnings.warn`` called by the caller of this function that points at
    the first frame outside captum_ext and Captum: the user's call, also when it came through
    NoiseTunnel or Captum's logging wrapper."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGES):
        frame, level = frame.f_back, level + 1
    return level
