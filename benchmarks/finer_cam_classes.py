"""Finer-CAM with many classes: the chunked nearest-class selection against the full orderings.

Run from the repository root::

    python benchmarks/finer_cam_classes.py            # about a minute on one CPU core
    python benchmarks/finer_cam_classes.py --classes 100 1000 5000

Finer-CAM's score compares every class with the classes whose logits are closest to its own.
``finer_scores`` used to order all C classes for each of the C classes (an N x C x C sort,
and a batched backward through N x C x C gathers for every chunk of contrast classes, as
VOICE does); it now keeps each class's nearest few, in chunks of classes
(``finer_cam.comparison_sets``). This script runs both in one process on a small CNN whose
last layer has C outputs (random weights, 4 images of 3 x 32 x 32, one torch thread):
``FinerCAM.attribute`` of the predictions and ``VOICE(FinerCAM)`` with every contrast class.
The full-orderings score is the former implementation, written out here as the baseline. The
maps of both are checked to be equal first. Prints one JSON line with the median times and
the ratios (full orderings / ours).
"""

from __future__ import annotations

import argparse
import json

import torch
from _timing import environment, time_call
from torch import nn

import captum_ext.attr.finer_cam as finer_module
from captum_ext._utils.precision import at_least_float32
from captum_ext.attr import VOICE, FinerCAM


def full_orderings_scores(logits, alpha, positions):
    """The former ``finer_scores``: every class's ordering of all C classes (N x C x C)."""
    logits = at_least_float32(logits)
    n, classes = logits.shape
    distance = (logits[:, :, None] - logits[:, None, :]).abs()
    distance = distance - torch.eye(classes, dtype=logits.dtype, device=logits.device)
    compared = distance.detach().argsort(dim=2, stable=True)[:, :, list(positions)]
    probability = logits.softmax(dim=1)
    weights = probability[:, None, :].expand(n, classes, classes).gather(2, compared)
    others = logits[:, None, :].expand(n, classes, classes).gather(2, compared)
    numerator = (weights * (logits[:, :, None] - alpha * others)).sum(dim=2)
    return numerator / (weights.sum(dim=2) + 1e-9)


def model_with(classes: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, classes),
    ).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ours = finer_module.finer_scores
    rows = {}
    for classes in args.classes:
        model = model_with(classes)
        calls = {
            "finer_cam": lambda model=model: FinerCAM(model, "2").attribute(x),
            "voice_all_contrasts": lambda model=model: VOICE(FinerCAM(model, "2")).attribute(x),
        }
        row = {}
        for name, call in calls.items():
            finer_module.finer_scores = full_orderings_scores
            try:
                expected = call()
                baseline = time_call(call, warmup=1, repeats=args.repeats)["median_s"]
            finally:
                finer_module.finer_scores = ours
            got = call()
            if isinstance(got, torch.Tensor):
                same = bool(torch.allclose(got, expected, rtol=1e-5, atol=1e-7))
            else:
                same = bool(torch.allclose(got.uncertainty, expected.uncertainty, atol=1e-6))
            if not same:
                raise SystemExit(f"{name} at {classes} classes: the maps differ")
            ours_s = time_call(call, warmup=1, repeats=args.repeats)["median_s"]
            row[name] = {
                "full_orderings_s": round(baseline, 4),
                "ours_s": round(ours_s, 4),
                "ratio": round(baseline / ours_s, 2),
            }
        rows[str(classes)] = row
    print(json.dumps({"benchmark": "finer_cam_classes", "env": environment("cpu"), "rows": rows}))


if __name__ == "__main__":
    main()
