"""Within-class diversity of network inversion: the preset's loss against added diversity.

Inverts the bundled DigitCNN with ``NetworkInversion(preset="inversion")`` (vector-matrix
conditioning, KL + CE + cosine 0.5 + orthogonality 0.5) and, with the same generator seed,
steps and batch, with the within-class cosine term added
(``weights={"class_cosine": w}``, :func:`captum_ext.inversion.losses.class_cosine_diversity`)
for each ``w`` of ``--class-cosine``, and with a larger weight on the papers' own batch-wide
cosine and orthogonality terms (``--batch-weight``). For each: label consistency, mean
confidence, within-class feature cosine (mean pairwise cosine of the penultimate features of
the samples of one class, averaged over classes; lower = more diverse) and pixel cosine, on
``--per-class`` samples per class drawn with ``sample(..., generator=1)``; real held-out
digits as the reference. One process, one thread, seed 0.

    python benchmarks/inversion_diversity.py [--steps 250] [--batch-size 64]
        [--class-cosine 2 5] [--batch-weight 2] [--per-class 16]
        [--grid-class-cosine 0.5 --png docs/_static/inversion_samples_class_cosine.png]

With ``--png``, a grid of 8 samples per class of the ``--grid-class-cosine`` variant is
written there (and one of the preset as ``*_preset.png``).

Prints a markdown table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from captum_ext.bundled import BUNDLED_INVERSION_OPTIONS, load_bundled_model
from captum_ext.data import denormalize_digits, normalize_digits
from captum_ext.data._mnist_split import load_mnist_split
from captum_ext.inversion.evaluation import (
    label_consistency,
    mean_confidence,
    sample_grid,
    within_class_diversity,
)
from captum_ext.inversion.network_inversion import NetworkInversion

SEED = 0


def metrics(model, images, labels) -> dict:
    return {
        "label_consistency": round(label_consistency(model, images, labels), 4),
        "mean_confidence": round(mean_confidence(model, images), 4),
        "feature_cosine": round(within_class_diversity(model, images, labels).mean, 4),
        "pixel_cosine": round(
            within_class_diversity(denormalize_digits(images), None, labels).mean, 4
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--class-cosine", type=float, nargs="*", default=[2.0, 5.0])
    parser.add_argument("--batch-weight", type=float, nargs="*", default=[2.0])
    parser.add_argument("--per-class", type=int, default=16)
    parser.add_argument("--grid-class-cosine", type=float, default=0.5)
    parser.add_argument("--png", default=None, help="write sample grids here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    budgets = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "samples_per_class": args.per_class,
        "threads": 1,
        "seed": SEED,
    }
    print("Budgets: " + json.dumps(budgets))
    model = load_bundled_model()
    labels = torch.arange(10).repeat_interleave(args.per_class)
    split = load_mnist_split()
    held = normalize_digits(torch.from_numpy(split.heldout_images).unsqueeze(1))
    held_y = torch.from_numpy(split.heldout_labels)
    rows = torch.cat([torch.nonzero(held_y == k).flatten()[: args.per_class] for k in range(10)])

    variants: dict[str, dict | None] = {"preset (cosine 0.5, orthogonality 0.5)": None}
    for w in args.batch_weight:
        variants[f"batch-wide cosine {w:g}, orthogonality {w:g}"] = {
            "cosine": w,
            "orthogonality": w,
        }
    for w in args.class_cosine:
        variants[f"preset + within-class cosine {w:g}"] = {"class_cosine": w}
    results = {}
    for name, weights in variants.items():
        start = time.perf_counter()
        inversion = NetworkInversion(
            model,
            preset="inversion",
            weights=weights,
            batch_size=args.batch_size,
            seed=SEED,
            **BUNDLED_INVERSION_OPTIONS,
        )
        inversion.fit(args.steps, progress=False)
        samples = inversion.sample(labels, generator=1)
        results[name] = {**metrics(model, samples, labels), "weights": weights}
        results[name]["seconds"] = round(time.perf_counter() - start, 1)
        grid_weight = (weights or {}).get("class_cosine")
        if args.png and (weights is None or grid_weight == args.grid_class_cosine):
            grid_labels = torch.arange(10).repeat_interleave(8)
            figure = sample_grid(
                inversion.sample(grid_labels, generator=2),
                grid_labels,
                per_class=8,
                denormalize=denormalize_digits,
                title=f"{name}, {args.steps} steps",
            )
            path = args.png if weights else args.png.replace(".png", "_preset.png")
            figure.savefig(path, dpi=100)
            print(f"wrote {path}", flush=True)
        print(name, json.dumps(results[name]), flush=True)
    results["real held-out digits (reference)"] = metrics(model, held[rows], held_y[rows])

    print("\n| variant | label consistency | mean confidence | feature cosine | pixel cosine |")
    print("|---|---|---|---|---|")
    for name, row in results.items():
        print(
            f"| {name} | {row['label_consistency']:.3f} | {row['mean_confidence']:.3f} | "
            f"{row['feature_cosine']:.3f} | {row['pixel_cosine']:.3f} |"
        )
    print(json.dumps({"benchmark": "inversion_diversity", "budgets": budgets, **results}))


if __name__ == "__main__":
    main()
