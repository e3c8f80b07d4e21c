"""Benchmark: PathwayGradient against Captum's Saliency on the same batch, in one process.

Run from the repository root::

    python benchmarks/pathway_gradient.py            # resnet18 at 112 x 112, batch 8, and digits
    python benchmarks/pathway_gradient.py --quick    # smaller inputs, a few seconds
    python benchmarks/pathway_gradient.py --device cuda

Cases: torchvision resnet18 with random weights (``weights=None``, seeded, eval mode; 17 ReLU
sites, its in-place ReLUs called twice per block), and the bundled digit CNN on 64 sample
digits. Per case, ``PathwayGradient(model).attribute(x, target=t, sparsity=0.7)`` (the
Taylor score: one forward and backward to score the neurons, one to take the gradient of the
pruned network) and ``Saliency(model).attribute(x, target=t, abs=False)`` are timed in
interleaved rounds on the same batch and targets. The issue's target: PathwayGradient takes
at most 2.5 times Saliency's time. ``score="integrated"`` (``n_steps`` copies of the batch per
site) is timed too, for information.

Prints one JSON line on stdout; a readable summary goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torchvision
from _timing import environment, time_interleaved
from captum.attr import Saliency

from captum_ext.attr import PathwayGradient
from captum_ext.bundled import load_bundled_model
from captum_ext.data import load_sample_digits

TARGET_RATIO = 2.5  # PathwayGradient time / Saliency time, at most


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_case(name, model, x, target, device, repeats, integrated):
    pathway = PathwayGradient(model)
    saliency = Saliency(model)
    fns = {
        "saliency": lambda: saliency.attribute(x.clone(), target=target, abs=False),
        "pathway_gradient": lambda: pathway.attribute(x, target=target, sparsity=0.7),
    }
    if integrated:
        fns["pathway_gradient_integrated"] = lambda: pathway.attribute(
            x, target=target, sparsity=0.7, score="integrated", n_steps=11
        )
    times = time_interleaved(fns, warmup=1, repeats=repeats, device=device)
    base = times["saliency"]["median_s"]
    row = {
        "case": name,
        "batch": x.shape[0],
        "input": list(x.shape[1:]),
        "median_s": {k: round(v["median_s"], 4) for k, v in times.items()},
        "ratio_vs_saliency": {
            k: round(v["median_s"] / base, 3) for k, v in times.items() if k != "saliency"
        },
    }
    row["meets_target"] = row["ratio_vs_saliency"]["pathway_gradient"] <= TARGET_RATIO
    log(f"{name}: {row['median_s']} ratios {row['ratio_vs_saliency']}")
    return row


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    size, batch = (64, 4) if args.quick else (112, 8)
    torch.manual_seed(args.seed)
    resnet = torchvision.models.resnet18(weights=None).eval().to(device)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(args.seed)).to(
        device
    )
    with torch.no_grad():
        target = resnet(x).argmax(1)
    rows = [run_case("resnet18 (random)", resnet, x, target, device, args.repeats, not args.quick)]
    digits, labels = load_sample_digits()
    digit_model = load_bundled_model().eval().to(device)
    many = digits.repeat(2, 1, 1, 1)[:64].to(device)
    rows.append(
        run_case(
            "bundled digit CNN",
            digit_model,
            many,
            labels.repeat(2)[:64].to(device),
            device,
            args.repeats,
            True,
        )
    )
    result = {
        "benchmark": "pathway_gradient",
        "target_ratio": TARGET_RATIO,
        "seed": args.seed,
        "quick": args.quick,
        "cases": rows,
        "environment": environment(device),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
