"""Every notebook in tutorials/ runs from top to bottom without an error, quickly by default.

The notebooks are stored without outputs. ``_notebook_runs.execute`` runs each one once per
test session with nbclient (the docs build in test_docs.py renders the same executed copies
instead of executing the notebooks again). The heavy notebooks read ``CAPTUM_EXT_FULL_RUN``
in a parameter cell: small budgets by default, the full ones with ``CAPTUM_EXT_FULL_RUN=1``
(``CAPTUM_EXT_FULL_RUN=1 python -m pytest tests/test_tutorials.py -m slow`` executes those).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("jupyter_client")

from _notebook_runs import NOTEBOOKS, TUTORIALS, execute  # noqa: E402

FULL_RUN_SWITCH = "CAPTUM_EXT_FULL_RUN"
#: The notebooks whose default run trains or fits something and so has a full-run switch.
HEAVY = ("minimal_masks", "ood_tie")


def test_tutorials_exist():
    assert NOTEBOOKS, f"no notebooks found in {TUTORIALS}"


def test_tutorials_stored_without_outputs():
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        for index, cell in enumerate(notebook.cells):
            if cell.cell_type != "code":
                continue
            assert not cell.outputs, f"{path.name}: cell {index} has stored outputs"
            assert cell.execution_count is None, f"{path.name}: cell {index} has a count"


@pytest.mark.parametrize("stem", HEAVY)
def test_heavy_tutorials_have_a_documented_full_run_switch(stem: str):
    """A parameter cell reads the switch, and the text tells the reader how to use it."""
    notebook = nbformat.read(TUTORIALS / f"{stem}.ipynb", as_version=4)
    parameters = [
        cell
        for cell in notebook.cells
        if cell.cell_type == "code" and "parameters" in cell.metadata.get("tags", [])
    ]
    assert len(parameters) == 1, f"{stem}: expected one code cell tagged 'parameters'"
    assert f'os.environ.get("{FULL_RUN_SWITCH}")' in parameters[0].source
    prose = "\n".join(c.source for c in notebook.cells if c.cell_type == "markdown")
    assert f"{FULL_RUN_SWITCH}=1" in prose, f"{stem}: the markdown does not explain the switch"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_tutorial_executes(path: Path, tmp_path_factory: pytest.TempPathFactory):
    run = execute(path, tmp_path_factory.getbasetemp())
    if run.failure is not None:
        pytest.fail(f"{path.name} failed:\n{run.failure}", pytrace=False)
    print(f"{path.name}: executed in {run.seconds:.1f} s")

    code_cells = [cell for cell in run.notebook.cells if cell.cell_type == "code"]
    assert code_cells and all(cell.execution_count is not None for cell in code_cells)
    errors = [
        output
        for cell in code_cells
        for output in cell.outputs
        if output.get("output_type") == "error"
    ]
    assert not errors, errors
    # the executed copy the docs build renders holds the same outputs
    copy = nbformat.read(run.executed_copy, as_version=4)
    assert [c.get("outputs") for c in copy.cells] == [c.get("outputs") for c in run.notebook.cells]


def test_no_hard_coded_budget_claims_in_prose():
    """Numbers that a default run computes are printed by the code, not written in the text."""
    stale = {  # sentences that stated the results of one particular budget
        "minimal_masks": [
            r"300 Adam steps here",
            r"roughly a third of the pixels",
            r"thousands of times faster",
        ],
        "ood_tie": [
            r"2,000 of the 4,000",
            r"ceil\(2000 / 110\)",
            r"is rejected \(near\) perfectly",
            r"TIE is clearly ahead",
            r"TIE sends none of it",
        ],
    }
    for stem, patterns in stale.items():
        notebook = nbformat.read(TUTORIALS / f"{stem}.ipynb", as_version=4)
        prose = "\n".join(c.source for c in notebook.cells if c.cell_type == "markdown")
        for pattern in patterns:
            assert not re.search(pattern, prose), f"{stem}: {pattern!r} is stated, not computed"


def test_tutorials_use_one_torch_thread():
    """The bundled model is tiny: with two or more intra-op threads on a loaded machine the
    threads wait on each other and a training loop runs several times slower (measured: 60
    counterfeit-generator steps took 159 s on 2 threads, 18 s on 1, at load 9 on 2 cores)."""
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        code = "\n".join(c.source for c in notebook.cells if c.cell_type == "code")
        assert "torch.set_num_threads(1)" in code, f"{path.name} runs torch on every core"
