"""The Sphinx documentation builds with warnings as errors, tutorials executed.

``sphinx-build -W --keep-going -b html docs <tmp>`` runs in a subprocess (a fresh interpreter,
as in CI), so docstring formatting problems anywhere in the public API fail this test. The
Python examples written in the pages themselves are run too.

The tutorials are executed once per session by ``_notebook_runs`` (shared with
test_tutorials.py, whichever runs first) and the build renders those executed copies
(``CAPTUM_EXT_EXECUTED_NOTEBOOKS``) instead of executing every notebook a second time. A
notebook that fails is reported by test_tutorials.py; the docs still build around it.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
BUILD_TIMEOUT_S = 1800  # about a minute here; a wide margin for a loaded CI machine
PAGES_WITH_EXAMPLES = (
    "docs/index.md",
    "docs/methods.md",
    "docs/evaluation.md",
    "docs/segmentation.md",
    "README.md",
)


@pytest.fixture(scope="module")
def html(tmp_path_factory: pytest.TempPathFactory) -> Path:
    for module in ("sphinx", "myst_nb", "furo", "ipykernel", "nbclient", "nbformat"):
        pytest.importorskip(module)
    from _notebook_runs import EXECUTED_ENV, execute_all, executed_folder

    base = tmp_path_factory.getbasetemp()
    execute_all(base)  # each notebook once per session, shared with test_tutorials.py
    env = dict(os.environ, **{EXECUTED_ENV: str(executed_folder(base))})
    out = tmp_path_factory.mktemp("docs") / "html"
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html"]
    start = time.perf_counter()
    completed = subprocess.run(
        [*command, str(DOCS), str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
    )
    elapsed = time.perf_counter() - start
    (out.parent / "build.log").write_text(completed.stdout + completed.stderr, encoding="utf-8")
    if completed.returncode != 0:
        log = completed.stdout + completed.stderr
        lines = log.splitlines()
        # in order, once each (Sphinx repeats them at the end)
        problems = dict.fromkeys(line for line in lines if re.search(r"\b(WARNING|ERROR)\b:", line))
        pytest.fail(
            f"sphinx-build failed (exit {completed.returncode}); warnings and errors:\n"
            + "\n".join(problems)
            + f"\n\nend of the log:\n{log[-10000:]}",
            pytrace=False,
        )
    print(f"docs built in {elapsed:.1f} s")
    return out


def _page(html: Path, name: str) -> str:
    path = html / name
    assert path.is_file(), f"{name} was not built"
    return path.read_text(encoding="utf-8")


@pytest.mark.slow
def test_index(html: Path):
    text = re.sub(r"<[^>]+>", "", _page(html, "index.html"))  # code is split into spans
    assert "ContrastCAM" in text
    assert "pip install" in text


@pytest.mark.slow
def test_api_reference_documents_the_public_names(html: Path):
    from captum_ext import attr, data

    attr_page = _page(html, "api/attr.html")
    assert "ContrastCAM" in attr_page
    for name in attr.__all__:
        assert f'id="captum_ext.attr.{name}"' in attr_page, name
    assert 'id="captum_ext.attr.ContrastCAM.attribute"' in attr_page
    data_page = _page(html, "api/data.html")
    for name in data.__all__:
        assert f'id="captum_ext.data.{name}"' in data_page, name
    from captum_ext import metrics

    metrics_page = _page(html, "api/metrics.html")
    for name in metrics.__all__:
        assert f'id="captum_ext.metrics.{name}"' in metrics_page, name
    from captum_ext import circuits, inversion

    inversion_page = _page(html, "api/inversion.html")
    for name in inversion.__all__:
        assert f'id="captum_ext.inversion.{name}"' in inversion_page, name

    circuits_page = _page(html, "api/circuits.html")
    for name in circuits.__all__:
        assert f'id="captum_ext.circuits.{name}"' in circuits_page, name
    from captum_ext import token_grid

    token_grid_page = _page(html, "api/token_grid.html")
    for name in token_grid.__all__:
        assert f'id="captum_ext.token_grid.{name}"' in token_grid_page, name
    from captum_ext import exported

    exported_page = _page(html, "api/exported.html")
    for name in exported.__all__:
        assert f'id="captum_ext.exported.{name}"' in exported_page, name
    from captum_ext import bundled, introspection, testing

    for module, page in (
        (introspection, "api/introspection.html"),
        (testing, "api/testing.html"),
        (bundled, "api/data.html"),
    ):
        text = _page(html, page)
        for name in module.__all__:
            assert f'id="{module.__name__}.{name}"' in text, (page, name)
    # the value is written out in docs/api/data.rst: it must follow the package
    assert f"&quot;{data.BUNDLED_CAM_LAYER}&quot;" in data_page


@pytest.mark.slow
def test_viz_and_cli_pages(html: Path):
    viz = pytest.importorskip("captum_ext.viz")
    viz_page = _page(html, "api/viz.html")
    for name in viz.__all__:
        assert f'id="captum_ext.viz.{name}"' in viz_page, name
    cli_page = _page(html, "api/cli.html")
    assert "captum-ext report" in cli_page
    assert "--model" in cli_page, "the executed `captum-ext report --help` output is missing"


@pytest.mark.slow
def test_methods_page_reads_the_bundled_model_accuracy(html: Path):
    from captum_ext.bundled import bundled_model_info

    accuracy = f"{100 * bundled_model_info()['heldout_accuracy']:.1f} %"
    assert accuracy in _page(html, "methods.html")


@pytest.mark.slow
def test_tutorial_is_rendered_with_outputs(html: Path):
    page = _page(html, "tutorials/contrastive_explanations.html")
    assert "ContrastCAM" in page
    assert "<img" in page, "the executed notebook's figures are missing"
    assert "max abs difference" in page, "the executed notebook's printed output is missing"


@pytest.mark.slow
def test_tutorials_rendered_from_the_shared_execution(html: Path):
    """Every tutorial page shows outputs, and the build executed no notebook itself."""
    from _notebook_runs import NOTEBOOKS

    log = (html.parent / "build.log").read_text(encoding="utf-8")
    executed = [line for line in log.splitlines() if "Executing" in line and "tutorials" in line]
    assert not executed, f"the docs build executed a tutorial again: {executed}"
    for path in NOTEBOOKS:
        page = _page(html, f"tutorials/{path.stem}.html")
        assert 'class="cell_output' in page, f"{path.stem}: rendered without outputs"


@pytest.mark.parametrize("name", PAGES_WITH_EXAMPLES)
def test_examples_in_pages_run(name: str):
    """The ```python blocks of a page run in order, as a reader would paste them."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / name).read_text(encoding="utf-8"), re.S)
    assert blocks, f"no Python examples found in {name}"
    namespace: dict = {}
    for number, block in enumerate(blocks):
        exec(compile(block, f"{name}, example {number + 1}", "exec"), namespace)


# ------------------------------------------------------------------ the Conventions page

CONVENTIONS = DOCS / "conventions.md"


def _toctree_entries(page: Path) -> list[str]:
    blocks = re.findall(r"```\{toctree\}\n(.*?)```", page.read_text(encoding="utf-8"), re.S)
    return [
        line.strip()
        for block in blocks
        for line in block.splitlines()
        if line.strip() and not line.strip().startswith(":")
    ]


def _conventions_names() -> list[str]:
    """Every dotted ``captum_ext...`` name the page writes in backticks."""
    text = CONVENTIONS.read_text(encoding="utf-8")
    return sorted(set(re.findall(r"`(captum_ext(?:\.\w+)*)`", text)))


def _resolve(dotted: str):
    """Import the longest module prefix of ``dotted``, then read the rest as attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[cut:]:
            obj = getattr(obj, attribute)
        return obj
    raise ModuleNotFoundError(dotted)


def test_conventions_page_is_in_the_toctree():
    assert CONVENTIONS.is_file()
    assert "conventions" in _toctree_entries(DOCS / "index.md")
    assert CONVENTIONS.read_text(encoding="utf-8").startswith("# Conventions\n")


def test_conventions_page_names_names():
    names = _conventions_names()
    # the page's tables: metric pairs, the guard, the import layers
    assert "captum_ext.metrics.auac" in names
    assert "captum_ext._utils.model_state.preserved_state" in names
    assert "captum_ext.cli" in names


@pytest.mark.parametrize("dotted", _conventions_names())
def test_names_on_the_conventions_page_import(dotted: str):
    """Each public class, function and module the page names imports from where it says."""
    assert _resolve(dotted) is not None
