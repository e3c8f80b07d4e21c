"""Supervised ceiling for the letters OOD target (issue 13): how well can this architecture
separate rendered letters from MNIST digits when it is TRAINED on letters?

This is a ceiling diagnostic, not a detector: the model sees letters (other random draws
than the test letters, same font and alphabet) as an eleventh class. It answers whether the
letters target (AUROC >= .99, FPR@95 <= .05 against the held-out digits) is attainable at
all with the bundled ``DigitCNN`` architecture on each letters set, and, by training on one
kind of letters and testing on the other, how much of the separation comes from the raw
letters' preprocessing (their ink boxes are not scaled to MNIST's 20 px, see
``benchmarks/ood.py``) rather than from their shape.

For each letters kind used in training (``raw`` or ``mnist``, the MNIST-normalised draws of
:func:`ood.mnist_normalise`) and each ``N letters x epochs`` configuration, a ``DigitCNN``
with 11 outputs is trained from scratch (``ood.train_digit_cnn``: Adam, lr 2e-3, batch 64,
seed 0) on the 4,000 training digits plus ``N`` letters labelled 10, and scored on the
1,000 held-out digits against the benchmark's 1,000 test letters of BOTH kinds (the very
draws ``benchmarks/ood.py`` uses, seed 0) and against the scikit-learn control digits
(not OOD: a high AUROC there means the model rejects digits from another source). Scores:
``max_{c<10} p_c`` (the paper's TIE score) and ``1 - p_10``. Accuracy: held-out digits,
argmax over the ten digit classes.

    python benchmarks/ood_ceiling.py [--train-letters raw mnist] [--configs 400x20 2000x20 4000x30]
        [--n-ood 1000]

Prints one markdown table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from ood import SEED, _to_inputs, json_ready, letters_set, metrics, ood_sets, train_digit_cnn

from captum_ext.data._mnist_split import load_mnist_split

LETTER_CLASS = 10


def parse_config(text: str) -> tuple[int, int]:
    """``"400x20"`` -> ``(400, 20)``: letters in training, epochs."""
    try:
        n, epochs = (int(v) for v in text.lower().split("x"))
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"expected N x EPOCHS like 400x20, got {text!r}"
        ) from error
    if n < 1 or epochs < 1:
        raise argparse.ArgumentTypeError(f"N and EPOCHS must be positive, got {text!r}")
    return n, epochs


def ceiling_scores(model, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Both scores of an 11-class model (higher = more in-distribution)."""
    with torch.no_grad():
        p = torch.cat([model(chunk).softmax(dim=1) for chunk in x.split(500)])
    return {
        "max digit p": p[:, :LETTER_CLASS].max(dim=1).values,
        "1 - p_letter": 1 - p[:, LETTER_CLASS],
    }


def digit_accuracy(model, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        logits = torch.cat([model(chunk) for chunk in x.split(500)])
    return float((logits[:, :LETTER_CLASS].argmax(dim=1) == y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--train-letters", nargs="+", default=["raw", "mnist"], choices=["raw", "mnist"]
    )
    parser.add_argument(
        "--configs",
        nargs="+",
        type=parse_config,
        default=[(400, 20), (2000, 20), (4000, 30)],
        help="letters in training x epochs",
    )
    parser.add_argument("--n-ood", type=int, default=1000, help="test letters per kind")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()

    split = load_mnist_split()
    x_train = _to_inputs(split.train_images)
    y_train = torch.from_numpy(split.train_labels).long()
    x_test = _to_inputs(split.heldout_images)
    y_test = torch.from_numpy(split.heldout_labels).long()
    raw_sets, mnist_sets = ood_sets(args.n_ood, "raw"), ood_sets(args.n_ood, "mnist")
    tests = {
        "letters (raw)": raw_sets["letters"],
        "letters (MNIST-normalised)": mnist_sets["letters (MNIST-normalised)"],
        "sklearn-digits (control)": raw_sets["sklearn-digits (control)"],
    }

    rows = []
    for kind in args.train_letters:
        for n_letters, epochs in args.configs:
            # other draws than the test letters (the same stream as ood.py --oracle-letters)
            _, pixels = letters_set(n_letters, np.random.default_rng(SEED + 777), kind)
            x = torch.cat([x_train, _to_inputs(pixels)])
            y = torch.cat([y_train, torch.full((n_letters,), LETTER_CLASS)])
            began = time.perf_counter()
            model = train_digit_cnn(x, y, LETTER_CLASS + 1, epochs)
            seconds = time.perf_counter() - began
            in_scores = ceiling_scores(model, x_test)
            row = {
                "train_letters": kind,
                "n_letters": n_letters,
                "epochs": epochs,
                "accuracy": digit_accuracy(model, x_test, y_test),
                "train_seconds": round(seconds, 1),
                "results": {},
            }
            for name, x_ood in tests.items():
                out_scores = ceiling_scores(model, x_ood)
                row["results"][name] = {
                    score: metrics(in_scores[score], out_scores[score]) for score in in_scores
                }
            rows.append(row)
            print(f"trained on {n_letters} {kind} letters, {epochs} epochs: {seconds:.0f} s")

    seconds = time.perf_counter() - start
    print(
        "\n| trained on letters | N x epochs | accuracy | test set | "
        "max digit p: AUROC / FPR@95 | 1 - p_letter: AUROC / FPR@95 |"
    )
    print("|---|---|---|---|---|---|")
    for row in rows:
        for name, by_score in row["results"].items():
            cells = [
                f"{by_score[s]['auroc']:.3f} / {by_score[s]['fpr95']:.3f}"
                for s in ("max digit p", "1 - p_letter")
            ]
            print(
                f"| {row['train_letters']} | {row['n_letters']} x {row['epochs']} | "
                f"{row['accuracy']:.3f} | {name} | {cells[0]} | {cells[1]} |"
            )
    print(f"\nTotal time: {seconds:.0f} s (1 thread)")
    print(
        json.dumps(
            {
                "benchmark": "ood_ceiling",
                "configs": [list(c) for c in args.configs],
                "n_ood": args.n_ood,
                "seed": SEED,
                "seconds": round(seconds, 1),
                "rows": json_ready(rows),
            }
        )
    )


if __name__ == "__main__":
    main()
