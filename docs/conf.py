"""Sphinx configuration of the captum-ext documentation.

Build with ``sphinx-build -W --keep-going -b html docs docs/_build/html``. The tutorials are
executed at build time: ``docs/tutorials`` is a relative symlink to the repository's
``tutorials/`` folder, where the notebooks are stored without outputs.
"""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))  # document this checkout, installed or not

import captum_ext  # noqa: E402
from captum_ext.data import bundled_model_info  # noqa: E402

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
nitpicky = False

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

nb_execution_mode = "force"  # the notebooks carry no outputs: run them on every build
nb_execution_timeout = 300  # seconds per cell
nb_execution_raise_on_error = True  # a failing cell fails the build
nb_execution_show_tb = True
nb_merge_streams = True

# -- HTML --------------------------------------------------------------------------------

html_theme = "furo"
html_title = f"captum-ext {release}"
