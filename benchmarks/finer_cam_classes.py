"""Finer-CAM with many classes: the explained classes' comparison sets against every class's.

Run from the repository root::

    python benchmarks/finer_cam_classes.py            # about two minutes on one CPU core
    python benchmarks/finer_cam_classes.py --classes 100 1000      # without 21,841 classes

Finer-CAM's score compares a class with the classes whose logits are closest to its own.
``finer_scores`` used to order all C classes for each of the C classes (an N x C x C sort,
and a batched backward through N x C x C gathers for every chunk of contrast classes, as
VOICE does); it then kept each class's nearest few, in chunks of classes
(``finer_cam.comparison_sets``), still for all C classes (N x C x C distances: about 11 s
per image at 21,841 classes); ``FinerCAM.attribute`` now finds only the explained classes'
sets (N x C' x C). This script runs the three in one process on a small CNN whose last
layer has C outputs (random weights, 4 images of 3 x 32 x 32, one torch thread):
``FinerCAM.attribute`` of the predictions, against the full orderings (the first
implementation, written out here; up to ``--full-max-classes``, as its N x C x C tensors
take 7.6 GB at 21,841 classes) and against every class's nearest-class sets (the previous
implementation: ``finer_scores`` without ``classes``); and ``VOICE(FinerCAM)`` with every
contrast class (which scores every class) against the full orderings, up to
``--voice-max-classes``. The maps are checked equal first; that call is the baseline's
warm-up, or its one timed run where it took ``--budget`` seconds or more (the timed runs of
a baseline stop after ``--budget`` seconds too). Prints one JSON line with the median times
and the ratios (baseline / ours).
"""

from __future__ import annotations

import argparse
import json
import time

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


def _same(got, expected) -> bool:
    if isinstance(got, torch.Tensor):
        return bool(torch.allclose(got, expected, rtol=1e-5, atol=1e-7))
    return bool(torch.allclose(got.uncertainty, expected.uncertainty, atol=1e-6))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[100, 1000, 21841])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=float, default=20.0, help="seconds per baseline")
    parser.add_argument("--full-max-classes", type=int, default=5000)
    parser.add_argument("--voice-max-classes", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ours = finer_module.finer_scores

    def every_class(logits, alpha, positions, classes=None):
        return ours(logits, alpha, positions)  # every class's set, whatever is explained

    def full_orderings(logits, alpha, positions, classes=None):
        return full_orderings_scores(logits, alpha, positions)

    rows = {}
    for classes in args.classes:
        model = model_with(classes)
        calls = {"finer_cam": lambda model=model: FinerCAM(model, "2").attribute(x)}
        baselines = {"finer_cam": {"all_classes": every_class}}
        if classes <= args.full_max_classes:
            baselines["finer_cam"]["full_orderings"] = full_orderings
        if classes <= args.voice_max_classes:
            calls["voice_all_contrasts"] = lambda model=model: VOICE(
                FinerCAM(model, "2")
            ).attribute(x)
            baselines["voice_all_contrasts"] = {"full_orderings": full_orderings}
        row = {}
        for name, call in calls.items():
            got = call()
            ours_s = time_call(call, warmup=1, repeats=args.repeats)["median_s"]
            row[name] = {"ours_s": round(ours_s, 4)}
            for baseline_name, baseline in baselines[name].items():
                finer_module.finer_scores = baseline
                try:
                    start = time.perf_counter()
                    expected = call()  # the warm-up, or the one run of a slow baseline
                    baseline_s = time.perf_counter() - start
                    if baseline_s < args.budget:
                        baseline_s = time_call(
                            call,
                            warmup=0,
                            repeats=args.repeats,
                            min_repeats=1,
                            budget_s=args.budget,
                        )["median_s"]
                finally:
                    finer_module.finer_scores = ours
                if not _same(got, expected):
                    raise SystemExit(f"{name} at {classes} classes: the maps differ")
                row[name][f"{baseline_name}_s"] = round(baseline_s, 4)
                row[name][f"{baseline_name}_ratio"] = round(baseline_s / ours_s, 2)
        rows[str(classes)] = row
    print(json.dumps({"benchmark": "finer_cam_classes", "env": environment("cpu"), "rows": rows}))


if __name__ == "__main__":
    main()
