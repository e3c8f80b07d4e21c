"""Deletion / insertion speed: one image at a time vs the whole batch in one call.

Issue 19 measured 19 s per 224-pixel image in the report. :func:`captum_ext.metrics.deletion`
builds all ``N * (n_steps + 1)`` perturbed images of a batch and runs them through the model
``batch_size`` rows per forward pass, so steps *and* images share forward passes. This script
times, on one process (CPU unless ``--device``), a small CNN and 8 random 224 x 224 images:

- ``per_image``: the old way of calling it, a Python loop of one-image calls;
- ``batched``: one call on the 8 images (default ``batch_size``, chosen by memory).

Both give the same AUCs (checked). It prints one JSON line with the timings and the ratio.

    python benchmarks/explanation_metrics.py [--images 8] [--size 224] [--n-steps 50] \\
        [--repeats 2] [--device cpu]

Timings are the fastest of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

from captum_ext.metrics import deletion, insertion


def small_cnn(classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 5, stride=4, padding=2),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, classes),
    ).eval()


def timed(fn, repeats: int) -> tuple[float, object]:
    """Fastest of ``repeats`` runs (the machine may be shared) and the last output."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--n-steps", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    device = torch.device(args.device)
    model = small_cnn().to(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(args.images, 3, args.size, args.size, generator=gen).to(device)
    maps = torch.rand(args.images, 1, args.size // 32, args.size // 32, generator=gen).to(device)
    kw = {"n_steps": args.n_steps, "baselines": "blur"}

    result = {"images": args.images, "size": args.size, "n_steps": args.n_steps}
    result["device"] = str(device)
    result["threads"] = torch.get_num_threads()
    for name, metric in (("deletion", deletion), ("insertion", insertion)):
        metric(model, x[:1], maps[:1], **kw)  # warm-up (allocator, oneDNN primitives)
        per_image_s, singles = timed(
            lambda metric=metric: torch.cat(
                [metric(model, x[i : i + 1], maps[i : i + 1], **kw) for i in range(len(x))]
            ),
            args.repeats,
        )
        batched_s, together = timed(
            lambda metric=metric: metric(model, x, maps, **kw), args.repeats
        )
        torch.testing.assert_close(together, singles, rtol=1e-4, atol=1e-5)
        result[name] = {
            "per_image_s": round(per_image_s, 3),
            "batched_s": round(batched_s, 3),
            "per_image_per_image_s": round(per_image_s / len(x), 3),
            "batched_per_image_s": round(batched_s / len(x), 3),
            "speedup": round(per_image_s / batched_s, 2),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
