"""Sphinx configuration of the captum-ext documentation.

Build with ``sphinx-build -W --keep-going -b html docs docs/_build/html``. The tutorials are
executed at build time: ``docs/tutorials`` is a relative symlink to the repository's
``tutorials/`` folder, where the notebooks are stored without outputs.

When ``CAPTUM_EXT_EXECUTED_NOTEBOOKS`` names a folder, nothing is executed: each tutorial is
rendered from the executed copy of the same name in that folder (the test suite executes
every notebook once, in ``tests/_notebook_runs.py``, and builds the docs from its copies). A
copy must come from the notebook as it is now: its code cells are compared with the source.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))  # document this checkout, installed or not

import captum_ext  # noqa: E402
from captum_ext.bundled import bundled_model_info  # noqa: E402

if not (DOCS / "tutorials").is_dir():
    raise RuntimeError(
        "docs/tutorials must be the symlink ../tutorials (on Windows, clone with "
        "`git config core.symlinks true`); the notebooks are not visible to Sphinx."
    )

# -- Project -----------------------------------------------------------------------------

project = "captum-ext"
author = "captum-ext contributors"
copyright = "captum-ext contributors"
release = captum_ext.__version__
version = ".".join(release.split(".")[:2])

# -- General -----------------------------------------------------------------------------

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinx.ext.mathjax",
    "myst_nb",
]
exclude_patterns = ["_build", "jupyter_execute", "**.ipynb_checkpoints", "**/__pycache__"]
# Every cross-reference must resolve (a broken one fails the -W build instead of rendering
# as plain text), except those to types documented elsewhere and the plain words of
# docstring types ("int, optional", "array-like"), which have no target here.
nitpicky = True
_EXTERNAL_MODULES = (
    "torch|torchvision|nn|numpy|np|collections|typing|os|pathlib|argparse|PIL|matplotlib"
    "|networkx|captum"  # captum itself, not captum_ext: "captum" must be followed by "."
)
nitpick_ignore_regex = [
    (r"py:.*", rf"({_EXTERNAL_MODULES})\..+"),
    (r"py:class", r"Tensor|Path|PathLike|Dataset|DataLoader|GraphModule|Attribution"),
    (r"py:class", r"optional|array-like|callable|sequence|tensor"),
]

# -- autodoc / napoleon (Captum-style Google docstrings: Args / Returns / Examples) --------

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_include_init_with_doc = False

# -- MyST and notebooks ------------------------------------------------------------------

myst_enable_extensions = ["amsmath", "dollarmath", "colon_fence", "substitution"]
myst_heading_anchors = 3

_info = bundled_model_info()
myst_substitutions = {
    "heldout_accuracy": f"{100 * _info['heldout_accuracy']:.1f} %",
    "train_accuracy": f"{100 * _info['train_accuracy']:.1f} %",
    "n_train": f"{_info['n_train']:,}",
    "n_heldout": f"{_info['n_heldout']:,}",
    "n_parameters": f"{_info['n_parameters']:,}",
    "cam_layer": f"`{_info['cam_layer']}`",
}

_executed = os.environ.get("CAPTUM_EXT_EXECUTED_NOTEBOOKS")
EXECUTED_NOTEBOOKS = Path(_executed).resolve() if _executed else None
if EXECUTED_NOTEBOOKS is not None and not EXECUTED_NOTEBOOKS.is_dir():
    raise RuntimeError(f"CAPTUM_EXT_EXECUTED_NOTEBOOKS={_executed}: no such folder")

# the notebooks carry no outputs: run them on every build; with executed copies of the
# tutorials, run only the other notebook pages (api/cli.md)
nb_execution_mode = "force"
nb_execution_excludepatterns = [] if EXECUTED_NOTEBOOKS is None else ["tutorials/*.ipynb"]
nb_execution_timeout = 1200  # seconds per cell: the tutorials take seconds, a margin for slow CI
nb_execution_raise_on_error = True  # a failing cell fails the build
nb_execution_show_tb = True
nb_merge_streams = True

# -- HTML --------------------------------------------------------------------------------

html_theme = "furo"
html_title = f"captum-ext {release}"
html_static_path = ["_static"]
html_css_files = ["captum-ext.css"]  # code blocks wrap: nothing cut off at the right edge


# -- Executed copies of the tutorials -----------------------------------------------------


def _code_sources(notebook: dict) -> list[str]:
    def text(source):
        return "".join(source) if isinstance(source, list) else source

    return [text(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code"]


def _use_executed_copy(app, docname: str, source: list[str]) -> None:
    """Render a tutorial from its executed copy (``CAPTUM_EXT_EXECUTED_NOTEBOOKS``)."""
    if EXECUTED_NOTEBOOKS is None or not docname.startswith("tutorials/"):
        return
    copy = EXECUTED_NOTEBOOKS / f"{docname.split('/', 1)[1]}.ipynb"
    if not copy.is_file():
        raise RuntimeError(f"{docname}: no executed copy {copy}")
    executed = json.loads(copy.read_text(encoding="utf-8"))
    if _code_sources(executed) != _code_sources(json.loads(source[0])):
        raise RuntimeError(f"{docname}: the executed copy {copy} comes from other code")
    source[0] = json.dumps(executed)


def setup(app):
    app.connect("source-read", _use_executed_copy)
