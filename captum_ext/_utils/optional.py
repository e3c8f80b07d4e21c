"""Optional dependencies (the ``extras`` extra): imported where a feature needs them, with an
ImportError that names the feature and the install command instead of a bare
``ModuleNotFoundError`` (or one blamed on a file that is fine)."""

from __future__ import annotations

import importlib
from types import ModuleType


def import_optional(module: str, feature: str, *, package: str | None = None) -> ModuleType:
    """``importlib.import_module(module)``, or an ImportError saying that ``feature`` needs
    ``package`` (default: the top-level name of ``module``) and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        name = package or module.split(".")[0]
        raise ImportError(
            f"{feature} needs {name}, which is not installed: pip install 'captum-ext[extras]' "
            f"(or pip install {name})."
        ) from None
