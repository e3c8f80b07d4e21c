"""Every docstring example runs as a reader who pastes it runs it.

``pytest --doctest-modules`` runs an example with the globals of the module it is written in,
so an example that forgets to import the function it documents passes there and fails for a
user (``NameError: name 'auac' is not defined``). Here each example gets only the names the
API reference's landing page (docs/api/index.md) says the examples take as given, the names
the root conftest.py gives the doctests: ``torch``, ``nn``, ``model``, ``images``,
``inputs``, ``labels``, ``shown``, ``x``, ``layer``, ``layer_module`` and ``DIGIT_CLASSES``.
Everything else an example uses it must import itself.

An example also shows the library used as it is meant to be: it sets off none of the
library's warnings of misuse (those point at the line of the caller, here the example's).
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import warnings

import pytest
import torch
from torch import nn

import captum_ext

# Modules whose examples are not checked here yet (being edited elsewhere); remove an entry
# once its examples import what they use.
NOT_YET_CHECKED: tuple[str, ...] = ()

# The flags of the doctest run (pyproject.toml's doctest_optionflags, less pytest's NUMBER).
OPTION_FLAGS = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS


def _checked_module_names() -> list[str]:
    names = ["captum_ext"]
    for info in pkgutil.walk_packages(captum_ext.__path__, "captum_ext."):
        if info.name.endswith("__main__"):
            continue
        if info.name.startswith(NOT_YET_CHECKED):
            continue
        names.append(info.name)
    return names


def _examples() -> list[doctest.DocTest]:
    finder = doctest.DocTestFinder()
    found = []
    for name in _checked_module_names():
        module = importlib.import_module(name)
        found.extend(test for test in finder.find(module, name) if test.examples)
    return found


EXAMPLES = _examples()


def _documented_names(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """The names of docs/api/index.md (and of the root conftest.py), nothing else."""
    from captum_ext.data import BUNDLED_CAM_LAYER, DIGIT_CLASSES, denormalize_digits

    return {
        "torch": torch,
        "nn": nn,
        "model": model,
        "images": images.clone(),
        "inputs": images.clone(),
        "labels": labels.clone(),
        "shown": denormalize_digits(images),
        "x": images[:4].clone(),
        "layer": BUNDLED_CAM_LAYER,
        "layer_module": model.get_submodule(BUNDLED_CAM_LAYER),
        "DIGIT_CLASSES": DIGIT_CLASSES,
    }


def test_the_examples_are_found():
    names = {test.name for test in EXAMPLES}
    assert "captum_ext.metrics.curves.auac" in names
    assert not any(name.startswith(NOT_YET_CHECKED) for name in names)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda test: test.name)
def test_example_runs_with_only_the_documented_names(
    example, fresh_bundled_model, sample_digits, monkeypatch, tmp_path
):
    monkeypatch.chdir(tmp_path)  # examples that save files save them here
    images, labels = sample_digits
    example.globs = _documented_names(fresh_bundled_model, images, labels)  # no module globals
    report: list[str] = []
    runner = doctest.DocTestRunner(optionflags=OPTION_FLAGS | doctest.REPORT_ONLY_FIRST_FAILURE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = runner.run(example, out=report.append, clear_globs=True)
    assert result.failed == 0, "".join(report)
    # the library's warnings name the caller's line: the example's "<doctest ...>" source
    at_the_example = [
        f"{warning.category.__name__}: {warning.message}"
        for warning in caught
        if warning.filename.startswith("<doctest")
        and not issubclass(warning.category, (DeprecationWarning, FutureWarning))
    ]
    assert not at_the_example, "\n".join(at_the_example)
