"""Offline OOD benchmark, part 2: letter-free detectors on low-level statistics.

Do detectors that look below the penultimate layer (or at the pixels) separate the rendered
letters of ``benchmarks/ood.py`` from MNIST digits, where max-softmax, energy, TIE, kNN and
Mahalanobis on the penultimate features do not (issue 13's target: AUROC >= .99 and
FPR@95 <= .05 against letters)? Everything runs on the CPU with one thread, fixed seeds, no
download; data, test sets, the ``--letters`` option, the open-set model and the metrics are
imported from ``benchmarks/ood.py`` unchanged.

Design, fixed before looking at any OOD number (benchmark baselines, not part of the
package; score: higher = more in-distribution):

- Fitting data: the 4,000 training digits are split by a seeded permutation (seed 0) into
  3,200 *fit* digits (class statistics, min/max, covariances, kNN banks, the PPCA model)
  and 800 *validation* digits (used only for the normalisers named below). The 1,000
  held-out digits are only scored. No OOD image is used for fitting or tuning, and no
  weight is tuned on OOD data.
- Layers: the outputs of every convolution and ReLU of ``DigitCNN.features``
  (``features.0, 1, 3, 4, 6, 7``: 16 x 28 x 28, 16 x 28 x 28, 32 x 14 x 14, 32 x 14 x 14,
  64 x 7 x 7, 64 x 7 x 7), in float64.
- ``Gram`` (Sastry & Oore, "Detecting Out-of-Distribution Examples with Gram Matrices",
  ICML 2020): for a layer's map ``F`` (C x HW) and order ``p = 1..10``,
  ``G_p = sign(F^p F^pT) |F^p F^pT|^(1/p)`` (``F^p`` element-wise), keeping the upper
  triangle with the diagonal. Per class *predicted by the model*, the minimum ``m`` and
  maximum ``M`` of every entry over the fit digits. An entry ``v``'s deviation is
  ``(m - v) / |m|`` below the range, ``(v - M) / |M|`` above it, 0 inside (1e-6 added to
  the denominators). A layer's deviation is the sum over its entries and orders, divided by
  its mean over the validation digits; the score is minus the sum over layers.
  ``Gram rowsum`` uses the row sums of ``G_p`` instead of the upper triangle (as the
  authors' released code does). ``Gram only <layer>`` is the one layer's normalised term.
- ``Maha-ens`` (Lee et al., "A Simple Unified Framework for Detecting Out-of-Distribution
  Samples and Adversarial Attacks", NeurIPS 2018, layer ensemble): per layer, the spatial
  mean of its output, class means (true labels) and one shared covariance on the fit
  digits, ``d_l = min_c`` squared Mahalanobis distance. The paper weights the layers by a
  regression fitted on OOD (or adversarial) data and perturbs the input; both are left out
  here, as they would tune on the test distribution. Instead ``Maha-ens z`` = minus the sum
  of the ``d_l`` standardised by their validation mean and std, ``Maha-ens raw`` = minus
  the plain sum, ``Maha penult.`` = minus ``d`` of ``features.7`` alone (the penultimate
  features, as ``Mahalanobis`` in ``ood.py`` but fitted on the 3,200 fit digits).
- ``kNN-multi`` (after Sun et al., "Out-of-Distribution Detection with Deep Nearest
  Neighbors", ICML 2022, on more than one layer): the six spatial means, each scaled to
  unit length, concatenated and scaled to unit length; minus the distance to the 10th
  nearest fit digit. ``kNN penult.``: the same on ``features.7`` alone; ``kNN pixels``: on
  the raw pixels.
- ``input complexity`` (Serra et al., "Input Complexity and Out-of-Distribution Detection
  with Likelihood-based Generative Models", ICLR 2020): ``S(x) = -log2 p(x) - L(x)``, with
  ``L(x)`` the length in bits of the 8-bit image compressed as PNG (Pillow,
  ``optimize=True``), and as likelihood model a probabilistic PCA (Tipping & Bishop 1999,
  40 components) of the fit digits' pixels in [0, 1], discretised to 256 levels per pixel;
  score ``-S``. ``PPCA NLL`` is the likelihood alone (``log2 p(x)``), ``complexity typ``
  the typicality of ``L`` alone (minus ``|L - median| / MAD`` on the validation digits).
  The paper uses deep generative models (Glow, PixelCNN++); PPCA is the small, offline
  stand-in, so this row tests the complexity correction, not those models.
- References on the same fit split: ``MSP`` (max softmax) and ``geometry``, the
  preprocessing probe of ``ood.py`` (minus ``|longer ink side - 20|``; NOT a detector of
  shape, see ``ood.py``).

Settings as in ``ood.py``: ``digits`` (the bundled DigitCNN; held-out digits against the
generated sets, with the sklearn digits as a control that a good detector should NOT
separate) and ``open-set`` (a DigitCNN trained here on the training digits 0-4 with
``ood.train_digit_cnn``, 8 epochs; held-out 0-4 against held-out 5-9).

``--letters both`` scores the raw and the MNIST-normalised letters (the same draws) as two
test sets of one run; every other figure is the same as in a ``raw`` or ``mnist`` run,
since nothing is fitted on a test set.

    python benchmarks/ood_lowlevel.py [--letters raw|mnist|both] [--settings digits open-set]
        [--n-ood 1000]

Prints markdown tables (cells AUROC / AUPR-In / FPR@95TPR) and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import time

import numpy as np
import ood  # benchmarks/ood.py, next to this script
import torch
import torch.nn.functional as F

from captum_ext.bundled import load_bundled_model
from captum_ext.data._mnist_split import load_mnist_split

LAYERS = ("features.0", "features.1", "features.3", "features.4", "features.6", "features.7")
PENULTIMATE = "features.7"
GRAM_ORDERS = range(1, 11)
EPS = 1e-6
K = 10
PPCA_COMPONENTS = 40
FIT_SHARE = 0.8


# ----------------------------------------------------------------------------- features
def layer_outputs(model, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every layer in ``LAYERS`` as float64 ``(N, C, H, W)``, and the logits."""
    modules = dict(model.named_modules())
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name in LAYERS}
    handles = [
        modules[name].register_forward_hook(
            lambda _m, _a, output, name=name: outputs[name].append(output.double())
        )
        for name in LAYERS
    ]
    logits = []
    try:
        with torch.no_grad():
            for chunk in x.split(500):
                logits.append(model(chunk))
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(values) for name, values in outputs.items()}, torch.cat(logits)


def pooled(features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Spatial mean of every layer: ``(N, C)``."""
    return {name: value.mean((2, 3)) for name, value in features.items()}


# ----------------------------------------------------------------------------- Gram
def gram_entries(feature_map: torch.Tensor, p: int, mode: str) -> torch.Tensor:
    """``(N, C, H, W)`` -> ``(N, K)``: the entries of ``sign(G) |G|^(1/p)``, ``G`` the Gram
    matrix of the element-wise ``p``-th power of the map; upper triangle with the diagonal
    (``mode="triu"``) or row sums (``"rowsum"``)."""
    powered = feature_map.flatten(2) ** p
    gram = powered @ powered.transpose(1, 2)
    if mode == "rowsum":
        gram = gram.sum(2)
    else:
        rows, cols = torch.triu_indices(gram.shape[1], gram.shape[2])
        gram = gram[:, rows, cols]
    return gram.sign() * gram.abs() ** (1.0 / p)


class GramDetector:
    """Sastry & Oore (2020): per predicted class, the range of every Gram entry on the fit
    digits; deviations outside it, normalised per layer by the validation digits' mean."""

    def __init__(self, features, predicted, classes: int, mode: str = "triu"):
        self.mode = mode
        self.low: dict = {}
        self.high: dict = {}
        for layer in LAYERS:
            for p in GRAM_ORDERS:
                entries = gram_entries(features[layer], p, mode)
                per_class = [entries[predicted == c] for c in range(classes)]
                self.low[layer, p] = torch.stack([e.min(0).values for e in per_class])
                self.high[layer, p] = torch.stack([e.max(0).values for e in per_class])
        self.scale = torch.ones(len(LAYERS), dtype=torch.float64)

    def layer_deviations(self, features, predicted) -> torch.Tensor:
        """``(N, layers)``: each layer's summed deviation divided by its validation mean."""
        columns = []
        for layer in LAYERS:
            total = torch.zeros(len(predicted), dtype=torch.float64)
            for p in GRAM_ORDERS:
                entries = gram_entries(features[layer], p, self.mode)
                low, high = self.low[layer, p][predicted], self.high[layer, p][predicted]
                total += (F.relu(low - entries) / (low.abs() + EPS)).sum(1)
                total += (F.relu(entries - high) / (high.abs() + EPS)).sum(1)
            columns.append(total)
        return torch.stack(columns, 1) / self.scale

    def normalise_on(self, features, predicted) -> None:
        self.scale = self.layer_deviations(features, predicted).mean(0)


# ----------------------------------------------------------------------------- Mahalanobis
class MahalanobisEnsemble:
    """Lee et al. (2018) per layer on spatial means (class means, one shared covariance),
    without input perturbation and without OOD-fitted layer weights."""

    def __init__(self, pooled_fit, labels, classes: int):
        self.params = {}
        for layer in LAYERS:
            values = pooled_fit[layer]
            means = torch.stack([values[labels == c].mean(0) for c in range(classes)])
            centred = values - means[labels]
            covariance = centred.T @ centred / len(values)
            self.params[layer] = (means, torch.linalg.pinv(covariance, hermitian=True))
        self.mean = torch.zeros(len(LAYERS), dtype=torch.float64)
        self.std = torch.ones(len(LAYERS), dtype=torch.float64)

    def distances(self, pooled_x) -> torch.Tensor:
        """``(N, layers)``: smallest squared Mahalanobis distance to a class mean."""
        columns = []
        for layer in LAYERS:
            means, precision = self.params[layer]
            offsets = pooled_x[layer][:, None, :] - means[None]
            squared = torch.einsum("nci,ij,ncj->nc", offsets, precision, offsets)
            columns.append(squared.min(1).values)
        return torch.stack(columns, 1)

    def normalise_on(self, pooled_val) -> None:
        distances = self.distances(pooled_val)
        self.mean, self.std = distances.mean(0), distances.std(0)

    def scores(self, pooled_x) -> dict[str, torch.Tensor]:
        distances = self.distances(pooled_x)
        return {
            "Maha-ens z": -((distances - self.mean) / self.std).sum(1),
            "Maha-ens raw": -distances.sum(1),
            "Maha penult.": -distances[:, LAYERS.index(PENULTIMATE)],
        }


# ----------------------------------------------------------------------------- kNN
def multi_layer_vector(pooled_x) -> torch.Tensor:
    parts = [F.normalize(pooled_x[layer], dim=1) for layer in LAYERS]
    return F.normalize(torch.cat(parts, 1), dim=1)


def knn_score(queries: torch.Tensor, bank: torch.Tensor, k: int = K) -> torch.Tensor:
    """Minus the distance to the ``k``-th nearest row of ``bank``."""
    out = [
        -torch.cdist(chunk, bank).topk(k, dim=1, largest=False).values[:, -1]
        for chunk in queries.split(1000)
    ]
    return torch.cat(out)


def unit_pixels(pixels: np.ndarray) -> torch.Tensor:
    return F.normalize(torch.as_tensor(pixels, dtype=torch.float64).flatten(1), dim=1)


# ----------------------------------------------------------------------------- complexity
def png_bits(pixels: np.ndarray) -> torch.Tensor:
    """Length in bits of each 8-bit image saved as PNG (Pillow, ``optimize=True``)."""
    from PIL import Image

    out = np.empty(len(pixels))
    for i, image in enumerate(pixels.astype(np.uint8)):
        buffer = io.BytesIO()
        Image.fromarray(image, mode="L").save(buffer, format="PNG", optimize=True)
        out[i] = 8 * len(buffer.getvalue())
    return torch.from_numpy(out)


class PPCA:
    """Probabilistic PCA (Tipping & Bishop 1999) of pixels in [0, 1]: covariance
    ``W W^T + sigma^2 I`` from the top ``q`` eigenvectors, ``sigma^2`` the mean of the
    other eigenvalues."""

    def __init__(self, pixels: np.ndarray, q: int = PPCA_COMPONENTS):
        x = torch.as_tensor(pixels, dtype=torch.float64).flatten(1) / 255.0
        self.mean = x.mean(0)
        centred = x - self.mean
        eigenvalues, eigenvectors = torch.linalg.eigh(centred.T @ centred / len(x))
        eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)
        self.dim = x.shape[1]
        sigma2 = eigenvalues[q:].mean()
        w = eigenvectors[:, :q] * (eigenvalues[:q] - sigma2).clamp_min(0).sqrt()
        covariance = w @ w.T + sigma2 * torch.eye(self.dim, dtype=torch.float64)
        self.precision = torch.linalg.inv(covariance)
        self.logdet = torch.linalg.slogdet(covariance).logabsdet

    def nll_bits(self, pixels: np.ndarray) -> torch.Tensor:
        """``-log2`` of the density discretised to 256 levels per pixel (bin width 1/255)."""
        x = torch.as_tensor(pixels, dtype=torch.float64).flatten(1) / 255.0 - self.mean
        mahalanobis = torch.einsum("ni,ij,nj->n", x, self.precision, x)
        nats = 0.5 * (mahalanobis + self.logdet + self.dim * math.log(2 * math.pi))
        return (nats + self.dim * math.log(255.0)) / math.log(2)


# ----------------------------------------------------------------------------- evaluation
def evaluate(model, x_fit, y_fit, x_val, x_in, sets, classes: int) -> tuple[dict, dict]:
    """Fit every detector on ``x_fit`` (normalisers on ``x_val``), score ``x_in`` against
    each set; returns ``{set: {method: metrics}}`` and timings in seconds."""
    start = time.perf_counter()
    timing = {"gram_score_s": 0.0}
    features_fit, logits_fit = layer_outputs(model, x_fit)
    features_val, logits_val = layer_outputs(model, x_val)
    predicted_fit, predicted_val = logits_fit.argmax(1), logits_val.argmax(1)

    tick = time.perf_counter()
    grams = {}
    for label, mode in (("Gram", "triu"), ("Gram rowsum", "rowsum")):
        grams[label] = GramDetector(features_fit, predicted_fit, classes, mode)
        grams[label].normalise_on(features_val, predicted_val)
    timing["gram_fit_s"] = time.perf_counter() - tick

    pooled_fit, pooled_val = pooled(features_fit), pooled(features_val)
    del features_fit, features_val
    mahalanobis = MahalanobisEnsemble(pooled_fit, y_fit, classes)
    mahalanobis.normalise_on(pooled_val)
    bank_multi = multi_layer_vector(pooled_fit)
    bank_penultimate = F.normalize(pooled_fit[PENULTIMATE], dim=1)
    pixels_fit = ood.to_pixels(x_fit)
    bank_pixels = unit_pixels(pixels_fit)
    ppca = PPCA(pixels_fit)
    bits_val = png_bits(ood.to_pixels(x_val))
    bits_median = bits_val.median()
    bits_mad = (bits_val - bits_median).abs().median()

    def score_all(x: torch.Tensor) -> dict[str, torch.Tensor]:
        features, logits = layer_outputs(model, x)
        predicted = logits.argmax(1)
        out = {}
        tick = time.perf_counter()
        deviations = {}
        for label, gram in grams.items():
            deviations[label] = gram.layer_deviations(features, predicted)
            out[label] = -deviations[label].sum(1)
        timing["gram_score_s"] += time.perf_counter() - tick
        for i, layer in enumerate(LAYERS):
            out[f"Gram only {layer}"] = -deviations["Gram"][:, i]
        pooled_x = pooled(features)
        del features
        out |= mahalanobis.scores(pooled_x)
        out["kNN-multi"] = knn_score(multi_layer_vector(pooled_x), bank_multi)
        out["kNN penult."] = knn_score(F.normalize(pooled_x[PENULTIMATE], dim=1), bank_penultimate)
        pixels = ood.to_pixels(x)
        out["kNN pixels"] = knn_score(unit_pixels(pixels), bank_pixels)
        bits = png_bits(pixels)
        nll = ppca.nll_bits(pixels)
        out["PPCA NLL"] = -nll
        out["input complexity"] = -(nll - bits)
        out["complexity typ"] = -(bits - bits_median).abs() / bits_mad
        out["MSP"] = logits.softmax(1).max(1).values
        side = torch.from_numpy(ood.image_geometry(pixels)[:, 0])
        out["geometry (probe)"] = -(side - ood.MNIST_BOX).abs()
        return {name: value.float() for name, value in out.items()}

    scores_in = score_all(x_in)
    table = {}
    for name, x_out in sets.items():
        scores_out = score_all(x_out)
        table[name] = {m: ood.metrics(scores_in[m], scores_out[m]) for m in scores_in}
    timing["total_s"] = time.perf_counter() - start
    return table, timing


def split_fit_val(x: torch.Tensor, y: torch.Tensor):
    """Seeded 80/20 split of the training digits into fit and validation digits."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(ood.SEED))
    n_fit = int(FIT_SHARE * len(x))
    return x[order[:n_fit]], y[order[:n_fit]], x[order[n_fit:]]


def print_table(setting: str, table: dict, timing: dict) -> None:
    rounded = {k: round(v, 1) for k, v in timing.items()}
    print(f"\n### {setting} (cells AUROC / AUPR-In / FPR@95TPR; timing {json.dumps(rounded)})")
    print("\n| method | " + " | ".join(table) + " |")
    print("|---|" + "---|" * len(table))
    for method in next(iter(table.values())):
        cells = [
            "{auroc:.3f}/{aupr_in:.3f}/{fpr95:.3f}".format(**table[name][method]) for name in table
        ]
        print(f"| {method} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--letters",
        default="raw",
        choices=["raw", "mnist", "both"],
        help="the letters test set: as rendered, normalised the MNIST way, or both",
    )
    parser.add_argument(
        "--settings",
        nargs="+",
        default=["digits", "open-set"],
        choices=["digits", "open-set"],
    )
    parser.add_argument("--n-ood", type=int, default=1000, help="images per generated set")
    parser.add_argument("--openset-epochs", type=int, default=8, help="0-4 model training")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    config = {
        "threads": 1,
        "letters": args.letters,
        "settings": args.settings,
        "n_ood_per_set": args.n_ood,
        "openset_training_epochs": args.openset_epochs,
        "layers": list(LAYERS),
        "gram_orders": [GRAM_ORDERS.start, GRAM_ORDERS.stop - 1],
        "k": K,
        "ppca_components": PPCA_COMPONENTS,
        "fit_share": FIT_SHARE,
        "seed": ood.SEED,
    }
    print("Config: " + json.dumps(config))

    split = load_mnist_split()
    x_train = ood._to_inputs(split.train_images)
    y_train = torch.from_numpy(split.train_labels)
    x_test = ood._to_inputs(split.heldout_images)
    y_test = torch.from_numpy(split.heldout_labels)
    sets = ood.ood_sets(args.n_ood, "raw" if args.letters == "both" else args.letters)
    if args.letters == "both":
        # the same draws normalised (the raw letters are whole pixel values, so
        # to_pixels recovers them exactly), listed right after the raw letters
        normalised = ood._to_inputs(ood.mnist_normalise(ood.to_pixels(sets["letters"])))
        items = list(sets.items())
        at = list(sets).index("letters") + 1
        sets = dict(items[:at] + [("letters (MNIST-normalised)", normalised)] + items[at:])
    dark = torch.Generator().manual_seed(ood.SEED + 1)
    sets["dark-noise (data stats)"] = (
        torch.randn(args.n_ood, 1, 28, 28, generator=dark) * x_train.std() + x_train.mean()
    )

    results, timings = {}, {}
    if "digits" in args.settings:
        x_fit, y_fit, x_val = split_fit_val(x_train, y_train)
        model = load_bundled_model().eval()
        results["digits"], timings["digits"] = evaluate(
            model, x_fit, y_fit, x_val, x_test, sets, 10
        )
    if "open-set" in args.settings:
        known_train, known_test = y_train < 5, y_test < 5
        model = ood.train_digit_cnn(
            x_train[known_train], y_train[known_train], 5, args.openset_epochs
        )
        with torch.no_grad():
            accuracy = (model(x_test[known_test]).argmax(1) == y_test[known_test]).double()
        x_fit, y_fit, x_val = split_fit_val(x_train[known_train], y_train[known_train])
        results["open-set"], timings["open-set"] = evaluate(
            model,
            x_fit,
            y_fit,
            x_val,
            x_test[known_test],
            {"digits 5-9": x_test[~known_test]},
            5,
        )
        config["openset_plain_accuracy"] = round(accuracy.mean().item(), 4)
        print(f"open-set model: held-out 0-4 accuracy {accuracy.mean().item():.3f}")
    seconds = time.perf_counter() - start
    for setting, table in results.items():
        print_table(setting, table, timings[setting])
    print(f"\nTotal time: {seconds:.0f} s (1 thread)")

    print(
        json.dumps(
            {
                "benchmark": "ood_lowlevel",
                "config": config,
                "seconds": round(seconds, 1),
                "timings": ood.json_ready(timings),
                "results": ood.json_ready(results),
            }
        )
    )


if __name__ == "__main__":
    main()
