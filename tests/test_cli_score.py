"""``captum-ext score``: end to end in subprocesses, and argument errors."""

from __future__ import annotations

import csv
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captum_ext.bundled import load_bundled_model
from captum_ext.cli import main
from captum_ext.data import load_sample_digits
from captum_ext.metrics import ScoreTable, gradtrust, softmax_confidence

TESTS = Path(__file__).parent


def run_cli(*args: str, cwd: Path, executable: list[str] | None = None):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    command = (executable or [sys.executable, "-m", "captum_ext"]) + list(args)
    return subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        return list(reader.fieldnames or []), list(reader)


def test_defaults_score_the_bundled_model_on_the_sample_digits(tmp_path):
    result = run_cli("score", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    path = tmp_path / "scores.csv"
    header, rows = read_rows(path)
    assert header == ["index", "path", "label", "prediction", "correct", "gradtrust", "softmax"]
    assert len(rows) == 40
    assert [int(row["index"]) for row in rows] == list(range(40))
    images, labels = load_sample_digits()
    assert [int(row["label"]) for row in rows] == labels.tolist()
    model = load_bundled_model()
    table = ScoreTable.from_csv(path)
    assert torch.equal(table["prediction"], model(images).argmax(1))
    torch.testing.assert_close(table["softmax"], softmax_confidence(model, images).double())
    torch.testing.assert_close(table["gradtrust"], gradtrust(model, images, log=True).double())
    accuracy = table["correct"].double().mean().item()
    assert f"40 examples, accuracy {accuracy:.1%}" in result.stdout
    assert str(path) in result.stdout or "scores.csv" in result.stdout
    assert "scoring" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--scores", "gradtrust,softmx"], "unknown score 'softmx'"),
        (["--scores", ""], "unknown score"),
        (["--batch-size", "0"], "expected a positive integer"),
        (["--weights", "w.pt"], "`--weights` needs `--model`"),
        (["--images", "missing-folder"], "not found"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    try:
        status = main(["score", "--no-progress", *args])
    except SystemExit as exit:
        status = exit.code
    captured = capsys.readouterr()
    assert status == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("captum-ext score: error:"), captured.err
    assert message in lines[0]
    assert not (tmp_path / "scores.csv").exists()


def test_bad_score_name_in_a_subprocess_has_no_traceback(tmp_path):
    result = run_cli("score", "--scores", "gradtrust,nope", cwd=tmp_path)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "unknown score 'nope'" in result.stderr and "gradtrust_reference" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_closed_output_pipe_ends_quietly_after_writing_the_scores(tmp_path):
    # `captum-ext score ... | head -0`: the reader is gone before the summary line is printed
    process = subprocess.Popen(
        [sys.executable, "-m", "captum_ext", "score", "--limit", "4", "--no-progress"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    process.stdout.close()
    stderr = process.stderr.read().decode()
    process.wait(timeout=600)
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr
    assert process.returncode == 141
    rows = list(csv.DictReader((tmp_path / "scores.csv").open()))
    assert len(rows) == 4


def write_digit_pngs(folder: Path) -> list[int]:
    """The first 6 sample digits as PNGs: digit sub-folders, one named folder, one loose."""
    images, labels = load_sample_digits()
    raw = ((images * 0.3081 + 0.1307).clamp(0, 1) * 255).round().to(torch.uint8)
    expected = []
    picks = [0, 4, 8, 12, 16, 20]  # digits 0..5
    for n, i in enumerate(picks):
        if n == 4:
            sub = folder / "misc"  # not a class: label -1
            expected.append(-1)
        elif n == 5:
            sub = folder  # no sub-folder: label -1
            expected.append(-1)
        else:
            sub = folder / str(int(labels[i]))
            expected.append(int(labels[i]))
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(raw[i, 0].numpy()).save(sub / f"img{n}.png")
    return expected


def test_image_folder_with_digit_subfolders(tmp_path):
    folder = tmp_path / "digits"
    write_digit_pngs(folder)
    out = tmp_path / "out" / "s.csv"
    result = run_cli(
        "score",
        "--images",
        str(folder),
        "--scores",
        "softmax,entropy,margin",
        "--out",
        str(out),
        "--batch-size",
        "4",
        "--no-progress",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    header, rows = read_rows(out)
    assert header[-3:] == ["softmax", "entropy", "margin"]
    # sorted by path: 0/, 1/, 2/, 3/, img5.png (loose), misc/
    by_path = {row["path"]: int(row["label"]) for row in rows}
    assert by_path == {
        "0/img0.png": 0,
        "1/img1.png": 1,
        "2/img2.png": 2,
        "3/img3.png": 3,
        "img5.png": -1,
        "misc/img4.png": -1,
    }
    correct = [row["correct"] == "True" for row in rows if int(row["label"]) >= 0]
    assert f"6 examples, accuracy {np.mean(correct):.1%} on 4 labelled" in result.stdout


def test_classes_file_names_the_subfolders(tmp_path):
    folder = tmp_path / "digits"
    for name in ("zero", "one"):
        (folder / name).mkdir(parents=True)
        Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(folder / name / "a.png")
    classes = tmp_path / "classes.txt"
    classes.write_text("zero\none\ntwo\nthree\nfour\nfive\nsix\nseven\neight\nnine\n")
    out = tmp_path / "s.csv"
    status = main(
        [
            "score",
            "--images",
            str(folder),
            "--classes",
            str(classes),
            "--out",
            str(out),
            "--scores",
            "softmax",
            "--no-progress",
        ]  # fmt: skip
    )
    assert status == 0
    _, rows = read_rows(out)
    assert [int(row["label"]) for row in rows] == [1, 0]  # one/ sorts before zero/


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_under_torchrun_rank_0_writes_the_single_process_table(tmp_path):
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not on PATH")
    single = tmp_path / "single.csv"
    args = ["score", "--scores", "softmax,gradtrust", "--batch-size", "7", "--no-progress"]
    assert main([*args, "--out", str(single)]) == 0
    result = run_cli(
        *args,
        "--out",
        "dist.csv",
        cwd=tmp_path,
        executable=[
            torchrun,
            "--nproc-per-node",
            "2",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(_free_port()),
            "-m",
            "captum_ext",
        ],
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("Scores written to") == 1  # rank 0 only
    assert (tmp_path / "dist.csv").read_text() == single.read_text()


def test_help_says_the_gradtrust_column_is_a_log_and_names_the_default_file(capsys):
    """The report shows GradTrust, the CSV its natural log (13.74 against 2.62 for one
    image); the help said neither that nor where the CSV goes by default."""
    from captum_ext.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["score", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "The gradtrust column holds the natural log of GradTrust" in text
    assert "the CSV file (default: scores.csv)" in text


def test_warnings_are_one_line_each_like_the_errors(tmp_path, capsys):
    """A warning (here: an image file skipped by its ending) printed Python's two lines naming
    a source file of the package; the command prints it as one line of its own."""
    from PIL import Image

    from captum_ext.cli import main

    folder = tmp_path / "digits"
    write_digit_pngs(folder)
    Image.open(folder / "img5.png").save(folder / "img6.ppm")
    out = tmp_path / "s.csv"
    argv = ["score", "--images", str(folder), "--scores", "softmax", "--out", str(out)]
    assert main([*argv, "--no-progress"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"captum-ext score: warning: `--images` {str(folder)!r}: skipped 1 files that Pillow "
        "may read as images, by endings not read (1 .ppm; only .png, .jpg, .jpeg, .jfif, .jpe, "
        ".bmp, .gif, .tif, .tiff, .webp files are read)."
    ]


def test_a_folder_is_read_batch_by_batch_not_all_at_once(tmp_path, monkeypatch):
    """`score` read the whole folder into one tensor before scoring (a folder of 50,000
    ImageNet images is 30 GB as float32); it reads two images to check the model, then each
    batch as it is scored. The table is the one the in-memory images give."""
    import captum_ext.data.loading as loading
    import captum_ext.metrics.dataset as dataset_module
    from captum_ext.cli import main

    folder = tmp_path / "digits"
    write_digit_pngs(folder)
    reads, seen_at_start = [], []
    read_image = loading._read_image
    monkeypatch.setattr(loading, "_read_image", lambda *a: reads.append(a[0]) or read_image(*a))
    score_dataset = dataset_module.score_dataset

    def spying(*args, **kwargs):
        seen_at_start.append(len(reads))
        return score_dataset(*args, **kwargs)

    monkeypatch.setattr(dataset_module, "score_dataset", spying)
    out = tmp_path / "s.csv"
    argv = ["score", "--images", str(folder), "--scores", "softmax,margin", "--out", str(out)]
    assert main([*argv, "--batch-size", "2", "--no-progress"]) == 0
    assert seen_at_start == [2] and len(reads) == 2 + 6
    header, rows = read_rows(out)
    images, paths = loading.load_image_folder(folder, "digits")
    from captum_ext.bundled import load_bundled_model
    from captum_ext.metrics import margin, softmax_confidence

    model = load_bundled_model()
    softmax, gap = softmax_confidence(model, images), margin(model, images)
    by_path = {row["path"]: row for row in rows}
    for i, path in enumerate(paths):
        row = by_path[path.relative_to(folder).as_posix()]
        assert float(row["softmax"]) == pytest.approx(float(softmax[i]), abs=1e-6)
        assert float(row["margin"]) == pytest.approx(float(gap[i]), abs=1e-6)


def test_the_same_warning_is_printed_once_a_run():
    """Every section that met a model's NaN rows printed the same line again (five times in
    one report run)."""
    from captum_ext.cli import _warning_line

    lines = []

    class Sink:
        def write(self, text):
            lines.append(text)

    show = _warning_line("captum-ext report")
    for _ in range(3):
        show(UserWarning("the same\n  warning"), UserWarning, "x.py", 1, file=Sink())
    show(UserWarning("another"), UserWarning, "x.py", 1, file=Sink())
    printed = [line for line in lines if line.strip()]
    assert printed == [
        "captum-ext report: warning: the same warning",
        "captum-ext report: warning: another",
    ]
