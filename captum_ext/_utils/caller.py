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


#: Captum's wrappers that repeat each example's inputs k times (in ``repeat_interleave``
#: order) and pass keywords they do not know unchanged
_EXPANDING_WRAPPERS = (
    os.path.join(os.path.dirname(captum.__file__), "attr", "_core", "noise_tunnel.py"),
    os.path.join(os.path.dirname(captum.__file__), "metrics", ""),
)


def inside_expanding_wrapper() -> bool:
    """Whether the current call came through Captum's NoiseTunnel, ``infidelity`` or
    ``sensitivity_max``, which hand a method N x k inputs with our per-example keywords
    (``contrast=``) still of length N."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename.startswith(_EXPANDING_WRAPPERS):
            return True
        frame = frame.f_back
    return False
