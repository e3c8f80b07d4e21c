"""Train the amortised activation-matching mask net of the bundled digit classifier.

Fits :class:`captum_ext.attr.ActivationMatchingMask` (``mode="amortised"``, the options
``captum_ext.bundled.MASK_OPTIONS``: the "sparse_confident" weights, and masked pixels
black, ``baseline=BUNDLED_BLACK`` = normalize_digits(0), as the papers' MNIST explanation
m * x in pixel space, since issue 13 (before: 0 in normalised space, a mean grey); matched
layers ``BUNDLED_MASK_LAYERS``) on the 4,000
training digits of :func:`captum_ext.data.load_mnist_split`, one CPU thread, fixed seed, and
writes into ``captum_ext/data``:

- ``bundled_mask_net.pt``    the mask net's state dict (``torch.load(..., weights_only=True)``)
- ``bundled_mask_net.json``  epochs, batch size, lr, seed, weights, baseline, and on the
                             1,000 held-out digits:
                             mean active-pixel fraction, label agreement, mean confidence on
                             x and on m * x, share of digits at least as confident on m * x,
                             the same after the pruning pass (``prune=True``, ``pruned_*``);
                             training time, torch version

The report's ``masks`` section and the tutorial load it with
:func:`captum_ext.bundled.load_bundled_mask_explainer`.

Usage::

    python scripts/train_bundled_mask_net.py [--epochs 25]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from captum_ext.attr import ActivationMatchingMask
from captum_ext.bundled import BUNDLED_MASK_LAYERS, MASK_OPTIONS, load_bundled_model
from captum_ext.data import load_mnist_split, normalize_digits

DATA_DIR = Path(__file__).resolve().parents[1] / "captum_ext" / "data"
SEED = 0
BATCH = 32
LR = 3e-4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--out-dir", default=str(DATA_DIR))
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_bundled_model()
    split = load_mnist_split()
    train = normalize_digits(torch.from_numpy(split.train_images)).unsqueeze(1)
    heldout = normalize_digits(torch.from_numpy(split.heldout_images)).unsqueeze(1)
    explainer = ActivationMatchingMask(model, BUNDLED_MASK_LAYERS, **MASK_OPTIONS)
    start = time.perf_counter()
    explainer.fit(
        DataLoader(TensorDataset(train), batch_size=BATCH), epochs=args.epochs, lr=LR, seed=SEED
    )
    seconds = time.perf_counter() - start
    details = explainer.attribute(heldout, return_details=True, seed=SEED, progress=False)
    pruned = explainer.prune(heldout, details, seed=SEED)
    info = {
        "epochs": args.epochs,
        "batch_size": BATCH,
        "lr": LR,
        "seed": SEED,
        "layers": list(BUNDLED_MASK_LAYERS),
        "weights": MASK_OPTIONS["weights"],
        "baseline": MASK_OPTIONS["baseline"],
        "heldout_active_fraction": float(details.active_fraction.mean()),
        "heldout_agreement": float(details.agreement.float().mean()),
        "heldout_confidence_x": float(details.confidence.mean()),
        "heldout_confidence_masked": float(details.explanation_confidence.mean()),
        "heldout_confidence_at_least_x": float(
            (details.explanation_confidence >= details.confidence).float().mean()
        ),
        "pruned_heldout_active_fraction": float(pruned.active_fraction.mean()),
        "pruned_heldout_agreement": float(pruned.agreement.float().mean()),
        "pruned_heldout_confidence_masked": float(pruned.explanation_confidence.mean()),
        "pruned_heldout_confidence_at_least_x": float(
            (pruned.explanation_confidence >= pruned.confidence).float().mean()
        ),
        "train_seconds": round(seconds, 1),
        "torch": torch.__version__,
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    explainer.save(out / "bundled_mask_net.pt")
    (out / "bundled_mask_net.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info))


if __name__ == "__main__":
    main()
