"""Every argument of a public function or method is described in its docstring's Args.

Two went undescribed (`expose_layer(final_layer=)`, `load_image_folder(exclude=)`) while a
scan of every name in the packages' ``__all__`` found them; this test is that scan. Only
docstrings that have an ``Args:`` section are checked (a helper documented in prose is not
held to it), and ``*args`` / ``**kwargs`` are not required.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re

import captum_ext

_ENTRY = re.compile(r"^\*{0,2}([A-Za-z_]\w*(?:\s*,\s*\*{0,2}[A-Za-z_]\w*)*)\s*(\([^)]*\))?\s*:")


def _documented_arguments(doc: str) -> set[str] | None:
    lines = inspect.cleandoc(doc).splitlines()
    found: set[str] | None = None
    for start, line in enumerate(lines):
        if line.strip() not in ("Args:", "Arguments:", "Keyword Args:", "Keyword Arguments:"):
            continue
        found = found or set()
        base = len(line) - len(line.lstrip())
        entry_indent = None
        for body in lines[start + 1 :]:
            if not body.strip():
                continue
            indent = len(body) - len(body.lstrip())
            if indent <= base:
                break
            entry_indent = indent if entry_indent is None else entry_indent
            match = _ENTRY.match(body.strip())
            if indent == entry_indent and match:
                found.update(name.strip().lstrip("*") for name in match.group(1).split(","))
    return found


def _public_callables():
    seen = set()
    for info in pkgutil.walk_packages(captum_ext.__path__, "captum_ext."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name)
            members = [(f"{info.name}.{name}", obj, None)]
            if inspect.isclass(obj):
                members = [
                    (f"{info.name}.{name}.{attr}", value, obj)
                    for attr, value in vars(obj).items()
                    if inspect.isfunction(value) and (attr == "__init__" or attr[0] != "_")
                ]
            for qualified, function, owner in members:
                if not callable(function) or id(function) in seen or inspect.isclass(function):
                    continue
                seen.add(id(function))
                yield qualified, function, owner


def test_every_argument_is_described():
    missing = []
    for qualified, function, owner in _public_callables():
        doc = function.__doc__ or ""
        if function.__name__ == "__init__" and owner is not None:
            doc = (owner.__doc__ or "") + "\n\n" + doc
        documented = _documented_arguments(doc)
        if documented is None:
            continue
        try:
            parameters = inspect.signature(function).parameters.values()
        except (TypeError, ValueError):
            continue
        for parameter in parameters:
            if parameter.name in ("self", "cls") or parameter.kind in (
                parameter.VAR_POSITIONAL,
                parameter.VAR_KEYWORD,
            ):
                continue
            if parameter.name not in documented:
                missing.append(f"{qualified}({parameter.name})")
    assert not missing, "arguments missing from their docstring's Args: " + ", ".join(missing)
