"""``captum-ext score`` wrote ``correct=False`` for every unlabelled image (label -1), as if
its prediction were wrong; the CSV now leaves that cell empty (unknown). In Python the
table's bool column keeps False there (documented), which :meth:`ScoreTable.from_csv` reads
the empty cell back as."""

from __future__ import annotations

import csv

import torch
from PIL import Image

from captum_ext.cli import main
from captum_ext.data import load_sample_digits
from captum_ext.metrics import ScoreTable

torch.set_num_threads(1)


def read_rows(path):
    with path.open(newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def test_to_csv_leaves_correct_empty_where_the_label_is_unknown(tmp_path):
    table = ScoreTable(
        {
            "index": torch.tensor([0, 1, 2]),
            "label": torch.tensor([3, -1, 4]),
            "prediction": torch.tensor([3, 3, 1]),
            "correct": torch.tensor([True, False, False]),
            "softmax": torch.tensor([0.9, 0.8, 0.7]),
        }
    )
    path = table.to_csv(tmp_path / "t.csv")
    assert [row["correct"] for row in read_rows(path)] == ["True", "", "False"]
    back = ScoreTable.from_csv(path)
    assert torch.equal(back["correct"], table["correct"])  # as score_dataset holds it


def test_score_command_leaves_unlabelled_rows_correct_empty(tmp_path, capsys):
    images, labels = load_sample_digits()
    raw = ((images[:3] * 0.3081 + 0.1307).clamp(0, 1) * 255).round().to(torch.uint8)
    folder = tmp_path / "digits"
    (folder / str(int(labels[0]))).mkdir(parents=True)
    Image.fromarray(raw[0, 0].numpy()).save(folder / str(int(labels[0])) / "a.png")
    for i in (1, 2):  # no class folder: label -1
        Image.fromarray(raw[i, 0].numpy()).save(folder / f"loose{i}.png")
    out = tmp_path / "s.csv"
    argv = ["score", "--images", str(folder), "--scores", "softmax", "--no-progress"]
    assert main(argv + ["--out", str(out)]) == 0, capsys.readouterr().err
    rows = {row["path"]: row for row in read_rows(out)}
    assert rows["loose1.png"]["label"] == "-1" and rows["loose1.png"]["correct"] == ""
    assert rows["loose2.png"]["correct"] == ""
    labelled = rows[f"{int(labels[0])}/a.png"]
    assert labelled["correct"] == str(int(labelled["prediction"]) == int(labelled["label"]))
    assert "on 1 labelled" in capsys.readouterr().out
