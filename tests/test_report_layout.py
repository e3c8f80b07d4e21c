"""The docs index reads at a phone width: its quick-start code block is not cut off.

Builds the index page alone (``docs/index.md`` with ``docs/conf.py`` and ``docs/_static``, no
other page, no notebook executed) with Sphinx into a temporary folder, then opens it in
headless Chromium at 1400 and 390 CSS pixels (see test_report_browser.py): the page does not
scroll sideways, and no code block hides part of its lines behind a scrollbar. Screenshots
are kept (``$CAPTUM_EXT_TEST_ARTEFACTS`` or the test's tmp dir).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_report_browser import artefact_dir, find_chromium, layout_in_chromium

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.fixture(scope="module")
def docs_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("sphinx")
    pytest.importorskip("furo")
    pytest.importorskip("myst_nb")
    source = tmp_path_factory.mktemp("docs-index") / "docs"
    source.mkdir()
    shutil.copy(DOCS / "conf.py", source / "conf.py")
    shutil.copy(DOCS / "index.md", source / "index.md")
    shutil.copytree(DOCS / "_static", source / "_static")
    (source / "tutorials").mkdir()  # conf.py wants the folder; no notebook in it
    out = source.parent / "html"
    completed = subprocess.run(
        [sys.executable, "-m", "sphinx", "-b", "html", "-q", str(source), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(DOCS.parent)},
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    index = out / "index.html"
    assert index.is_file()
    return index


def test_docs_css_is_linked(docs_index: Path):
    assert (docs_index.parent / "_static" / "captum-ext.css").is_file()
    assert "_static/captum-ext.css" in docs_index.read_text(encoding="utf-8")


@pytest.mark.slow
@pytest.mark.parametrize("width", [1400, 390])
def test_docs_index_code_is_not_cut_off(docs_index: Path, tmp_path: Path, width: int):
    executable = find_chromium()
    if executable is None:
        pytest.skip("headless Chromium not found (see test_report_browser.py)")
    shot = artefact_dir(tmp_path) / f"docs-index-{width}px.png"
    layout = layout_in_chromium(executable, docs_index.as_uri(), tmp_path / "profile", width, shot)
    assert shot.stat().st_size > 0
    assert layout["innerWidth"] == width
    assert layout["scrollWidth"] <= layout["innerWidth"], layout
    assert not layout["cutOff"], "\n".join(layout["cutOff"])
    assert not layout["hiddenCode"], "\n".join(layout["hiddenCode"])
