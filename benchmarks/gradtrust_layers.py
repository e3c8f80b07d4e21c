"""GradTrust with the gradients at each weight layer and over all parameters, against the
logit baselines, on the settings of ``benchmarks/gradtrust_evidence.py``.

At the final linear layer the paper's top-k form is a function of the softmax vector alone
(dCE(z, Q)/dW = (p - e_Q) h^T, h cancels in the ratio). Taken at an earlier layer's weight, or
over every parameter of the model, the gradients also depend on the features, so the score
can differ from softmax confidence. This script measures whether that helps misprediction
detection: for each setting (``bundled``, ``weak``, ``noisy``: see gradtrust_evidence.py) it
prints AUAC, AUFC and AUROC of

- ``gradtrust[<layer>]`` for the final layer (closed form), each convolution's weight
  (per-example autograd) and ``layer="all"`` (variance over every parameter entry), each
  with the default k = 5 counterfactual classes and ``log=True``;
- every other score of gradtrust_evidence.py (softmax confidence, margin, entropy, NLL,
  ODIN, MC-dropout, GradNorm, Purview) and ``energy``;

the Spearman correlation of each GradTrust variant with softmax confidence, and a 95%
paired-bootstrap interval of each score's AUROC minus that of softmax confidence (``--bootstrap``
resamples of the examples, seeded). Nothing is tuned. Prints one JSON line to stdout and
markdown tables to stderr.

    python benchmarks/gradtrust_layers.py [--weak-epochs 1] [--noise-std 1.0] [--n 1000]
        [--bootstrap 2000]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import rankdata, spearmanr

from captum_ext.bundled import load_bundled_model
from captum_ext.data import normalize_digits
from captum_ext.data._mnist_split import load_mnist_split
from captum_ext.metrics import (
    auac,
    aufc,
    energy,
    gradtrust,
    misprediction_auroc,
)

HERE = Path(__file__).resolve().parent
SEED = 0
BATCH = 100
#: the weight layers of the bundled DigitCNN, first to last ("classifier" = closed form)
LAYERS = ("features.0", "features.3", "features.6", "classifier", "all")


def _evidence():
    spec = importlib.util.spec_from_file_location(
        "gradtrust_evidence", HERE / "gradtrust_evidence.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def score_functions(evidence) -> dict:
    scores = {
        f"gradtrust[{layer}]": (lambda m, x, layer=layer: gradtrust(m, x, layer=layer, log=True))
        for layer in LAYERS
    }
    # the contrasts: only the runner-up class (k = 1) or every other class (k = C - 1 = 9)
    for layer, k in (("classifier", 1), ("classifier", 9), ("all", 1)):
        scores[f"gradtrust[{layer}, k={k}]"] = lambda m, x, layer=layer, k=k: gradtrust(
            m, x, layer=layer, k=k, log=True
        )
    baselines = evidence.score_functions(SEED)
    for name in ("gradtrust (top-k)", "gradtrust (reference)"):
        baselines.pop(name)  # gradtrust[classifier] is the top-k form at the last layer
    scores.update(baselines)
    scores["energy"] = energy
    return scores


def evaluate(evidence, model, images, labels, bootstrap: int) -> dict:
    model.eval()
    predictions = evidence.predict(model, images)
    correct = predictions == labels
    result = {
        "accuracy": float(correct.double().mean()),
        "n_errors": int((~correct).sum()),
        "scores": {},
    }
    values = {}
    for name, fn in score_functions(evidence).items():
        t0 = time.perf_counter()
        s = torch.cat(
            [fn(model, images[i : i + BATCH]).detach() for i in range(0, len(images), BATCH)]
        )
        values[name] = s
        result["scores"][name] = {
            "auac": auac(s, correct),
            "aufc": aufc(s, predictions, labels),
            "auroc": misprediction_auroc(s, correct),
            "seconds": round(time.perf_counter() - t0, 2),
        }
    confidence = values["softmax_confidence"].double().numpy()
    resamples = np.random.default_rng(SEED).integers(0, len(images), (bootstrap, len(images)))
    ok = correct.numpy()
    base = _bootstrap_auroc(confidence, ok, resamples)
    identity = _bootstrap_auroc(confidence, ok, np.arange(len(images))[None])[0]
    assert abs(identity - result["scores"]["softmax_confidence"]["auroc"]) < 1e-12  # same AUROC
    for name in values:
        v = values[name].double().numpy()
        if name.startswith("gradtrust["):
            rho = spearmanr(v, confidence).statistic
            result["scores"][name]["spearman_vs_softmax"] = float(rho)
        if bootstrap and name != "softmax_confidence" and np.isfinite(v).all():
            diff = _bootstrap_auroc(v, ok, resamples) - base
            lo, hi = np.nanpercentile(diff, [2.5, 97.5])
            result["scores"][name]["auroc_minus_softmax_ci95"] = [float(lo), float(hi)]
    return result


def _bootstrap_auroc(scores: np.ndarray, correct: np.ndarray, resamples: np.ndarray):
    """Mann-Whitney AUROC (mid-ranks) of ``correct`` vs wrong on each row of example indices
    (B, N); NaN where a resample has only one class. Paired: the same rows for every score."""
    s, ok = scores[resamples], correct[resamples]
    ranks = rankdata(s, axis=1)
    n_pos = ok.sum(1)
    n_neg = ok.shape[1] - n_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((ranks * ok).sum(1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def markdown(setting: str, description: str, result: dict) -> str:
    lines = [
        f"#### {setting}: {description}",
        "",
        f"Accuracy {result['accuracy']:.3f} ({result['n_errors']} errors).",
        "",
        "| score | AUAC | AUFC | AUROC | AUROC - softmax, 95% CI | Spearman vs softmax | s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in result["scores"].items():
        rho = r.get("spearman_vs_softmax")
        rho = f"{rho:.4f}" if rho is not None else ""
        ci = r.get("auroc_minus_softmax_ci95")
        ci = f"[{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci is not None else ""
        lines.append(
            f"| {name} | {r['auac']:.4f} | {r['aufc']:.4f} | {r['auroc']:.4f} | {ci} | {rho} "
            f"| {r['seconds']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weak-epochs", type=int, default=1)
    parser.add_argument("--noise-std", type=float, default=1.0)
    parser.add_argument("--n", type=int, default=1000, help="held-out digits used (first n)")
    parser.add_argument(
        "--bootstrap", type=int, default=2000, help="paired resamples for the AUROC CIs (0: none)"
    )
    args = parser.parse_args()
    t_start = time.perf_counter()
    evidence = _evidence()

    split = load_mnist_split()
    images = normalize_digits(torch.from_numpy(split.heldout_images)).unsqueeze(1)
    labels = torch.from_numpy(split.heldout_labels)
    noise_gen = torch.Generator().manual_seed(SEED)
    noisy = images + args.noise_std * torch.randn(images.shape, generator=noise_gen)
    images, noisy, labels = images[: args.n], noisy[: args.n], labels[: args.n]

    bundled = load_bundled_model().eval()
    t0 = time.perf_counter()
    weak = evidence.train_weak_model(args.weak_epochs)
    train_seconds = time.perf_counter() - t0

    settings = {
        "bundled": ("bundled model, clean held-out digits", bundled, images),
        "weak": (f"DigitCNN trained {args.weak_epochs} epoch(s), clean digits", weak, images),
        "noisy": (f"bundled model, digits + N(0, {args.noise_std}^2) noise", bundled, noisy),
    }
    results = {}
    for key, (description, model, x) in settings.items():
        results[key] = evaluate(evidence, model, x, labels, args.bootstrap)
        results[key]["description"] = description
        print(markdown(key, description, results[key]), file=sys.stderr, flush=True)

    out = {
        "benchmark": "gradtrust_layers",
        "n_heldout": len(labels),
        "weak_epochs": args.weak_epochs,
        "noise_std": args.noise_std,
        "seed": SEED,
        "bootstrap": args.bootstrap,
        "weak_train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "torch": torch.__version__,
        "settings": results,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
