"""Old, private home of :mod:`captum_ext.torchscript` (kept so existing imports work)."""

from __future__ import annotations

from typing import Any

_MOVED = (
    "TorchScriptLayerModel",
    "expose_layer",
    "expose_final_layer",
    "last_linear_name",
)


def __getattr__(name: str) -> Any:
    # A private path: re-exported without a warning (the package's own callers still import
    # from here); the public home is captum_ext.torchscript.
    if name in _MOVED:
        from .. import torchscript

        return getattr(torchscript, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
