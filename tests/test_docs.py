"""The Sphinx documentation builds with warnings as errors, tutorials executed.

``sphinx-build -W --keep-going -b html docs <tmp>`` runs in a subprocess (a fresh interpreter,
as in CI), so docstring formatting problems anywhere in the public API fail this test. The
Python examples written in the pages themselves are run too.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
BUILD_TIMEOUT_S = 600
PAGES_WITH_EXAMPLES = ("index.md", "methods.md")


@pytest.fixture(scope="module")
def html(tmp_path_factory: pytest.TempPathFactory) -> Path:
    for module in ("sphinx", "myst_nb", "furo", "ipykernel"):
        pytest.importorskip(module)
    out = tmp_path_factory.mktemp("docs") / "html"
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html"]
    start = time.perf_counter()
    completed = subprocess.run(
        [*command, str(DOCS), str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
    )
    elapsed = time.perf_counter() - start
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
    from captum_ext.data import bundled_model_info

    accuracy = f"{100 * bundled_model_info()['heldout_accuracy']:.1f} %"
    assert accuracy in _page(html, "methods.html")


@pytest.mark.slow
def test_tutorial_is_rendered_with_outputs(html: Path):
    page = _page(html, "tutorials/contrastive_explanations.html")
    assert "ContrastCAM" in page
    assert "<img" in page, "the executed notebook's figures are missing"
    assert "max abs difference" in page, "the executed notebook's printed output is missing"


@pytest.mark.parametrize("name", PAGES_WITH_EXAMPLES)
def test_examples_in_pages_run(name: str):
    """The ```python blocks of a page run in order, as a reader would paste them."""
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / name).read_text(encoding="utf-8"), re.S)
    assert blocks, f"no Python examples found in {name}"
    namespace: dict = {}
    for number, block in enumerate(blocks):
        exec(compile(block, f"{name}, example {number + 1}", "exec"), namespace)
