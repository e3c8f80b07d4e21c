"""Execute each tutorial notebook once per test session, shared by test_tutorials and test_docs.

``tests/test_tutorials.py`` checks that every notebook runs; ``tests/test_docs.py`` builds the
documentation, whose tutorial pages show the notebooks *with* their outputs. Both need the
same executions, and executing twice doubled the suite's slowest part, so the first caller
runs a notebook with nbclient and later callers get the stored result. The executed copies
(outputs included, also when a cell failed) are written to one folder per session; the docs
build reads them from there (``CAPTUM_EXT_EXECUTED_NOTEBOOKS``, see ``docs/conf.py``) and
executes nothing itself.

Each notebook runs on a kernel started from the interpreter running the tests
(``sys.executable -m ipykernel``), so it needs no registered Jupyter kernel and cannot pick up
another environment's ``python3`` kernel.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = ROOT / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
KERNEL_NAME = "captum-ext-tests"
#: Seconds one cell may take. The notebooks run in seconds to a minute on an idle 2-core
#: machine; this leaves a wide margin for a loaded or much slower one.
CELL_TIMEOUT_S = 1200
#: Environment variable that tells docs/conf.py where the executed copies are.
EXECUTED_ENV = "CAPTUM_EXT_EXECUTED_NOTEBOOKS"


@dataclass
class Execution:
    """One notebook executed: the notebook with outputs, the error text if a cell failed."""

    path: Path
    notebook: object
    failure: str | None
    seconds: float
    executed_copy: Path


_EXECUTIONS: dict[Path, Execution] = {}


def _register_kernel(jupyter_dir: Path) -> None:
    """A kernel spec, visible to this process only, that runs ipykernel on this interpreter."""
    spec_dir = jupyter_dir / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python {sys.version_info.major}.{sys.version_info.minor} (tests)",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")


@contextmanager
def _environment(**values: str):
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def executed_folder(base: Path) -> Path:
    """The folder of the executed copies for a session whose pytest base temp is ``base``."""
    return base / "executed-notebooks"


def execute(path: Path, base: Path) -> Execution:
    """Execute ``path`` (once per session; later calls return the first result).

    ``base`` is the session's temporary folder (``tmp_path_factory.getbasetemp()``); the
    kernel spec and the executed copy go below it.
    """
    import nbclient
    import nbformat

    path = path.resolve()
    if path in _EXECUTIONS:
        return _EXECUTIONS[path]
    jupyter_dir = base / "jupyter"
    _register_kernel(jupyter_dir)
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(  # owns its kernel: shut down when done
        notebook,
        kernel_name=KERNEL_NAME,
        timeout=CELL_TIMEOUT_S,
        allow_errors=False,
        resources={"metadata": {"path": str(path.parent)}},
    )
    failure = None
    start = time.perf_counter()
    # JUPYTER_PATH is searched first. The kernel inherits the environment, so the notebooks
    # run their small default budgets unless CAPTUM_EXT_FULL_RUN=1 is set for the tests.
    with _environment(JUPYTER_PATH=str(jupyter_dir)):
        try:
            client.execute()
        except (
            nbclient.exceptions.CellExecutionError,
            nbclient.exceptions.CellTimeoutError,
            nbclient.exceptions.DeadKernelError,
        ) as error:
            failure = f"{type(error).__name__}: " + re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    seconds = time.perf_counter() - start
    folder = executed_folder(base)
    folder.mkdir(parents=True, exist_ok=True)
    copy = folder / path.name
    nbformat.write(notebook, copy)
    _EXECUTIONS[path] = Execution(path, notebook, failure, seconds, copy)
    print(f"{path.name}: executed in {seconds:.1f} s")
    return _EXECUTIONS[path]


def execute_all(base: Path) -> dict[str, Execution]:
    """Every tutorial executed (each once per session), by notebook stem."""
    return {path.stem: execute(path, base) for path in NOTEBOOKS}
