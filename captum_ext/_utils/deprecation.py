"""Renamed arguments and moved names keep working for a while, with a DeprecationWarning."""

from __future__ import annotations

import functools
import importlib
import inspect
import warnings
from collections.abc import Callable
from typing import Any

from .caller import user_stacklevel


def renamed_arguments(**renames: str) -> Callable:
    """Accept the old keyword names of a function's arguments: ``@renamed_arguments(
    max_batch="batch_size")`` maps ``max_batch=`` to ``batch_size=`` with a
    ``DeprecationWarning``; giving both is a ``TypeError``.

    Works on functions and on methods (``__init__``, ``attribute``); the signature shown by
    ``help()`` and ``inspect.signature`` stays the new one.
    """

    def decorate(function: Callable) -> Callable:
        where = function.__qualname__.replace(".__init__", "")

        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old, new in renames.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(
                            f"{where}() got both `{old}` and `{new}`; `{old}` is the old name of "
                            f"`{new}`, pass only `{new}`."
                        )
                    warnings.warn(
                        f"{where}(): `{old}` is renamed `{new}`; the old name will be removed "
                        "in a future release.",
                        DeprecationWarning,
                        stacklevel=user_stacklevel(),  # the user's line, also when wrapped
                    )
                    kwargs[new] = kwargs.pop(old)
            return function(*args, **kwargs)

        wrapper.__signature__ = inspect.signature(function)  # type: ignore[attr-defined]
        return wrapper

    return decorate


def moved_names(module_name: str, moves: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for names that moved: ``moves`` maps each old name to
    ``"new.module:new_name"``. Accessing the old name warns once per access with a
    ``DeprecationWarning`` that says where it lives now.

    Usage, at the bottom of the old module::

        __getattr__ = moved_names(
            __name__, {"load_bundled_model": "captum_ext.bundled:load_bundled_model"}
        )
    """

    def __getattr__(name: str) -> Any:
        target = moves.get(name)
        if target is None:
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
        new_module, _, new_name = target.partition(":")
        warnings.warn(
            f"{module_name}.{name} has moved to {new_module}.{new_name}; import it from there "
            "(the old location will be removed in a future release).",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(new_module), new_name)

    return __getattr__
