"""Fit the introspective head (stage 2) of the bundled digit classifier.

Fits :class:`captum_ext.introspection.IntrospectiveNetwork` (per-class features of the final
linear layer, normalised per class; a three-layer MLP of width ``HIDDEN``) on the 4,000
training digits of :func:`captum_ext.data.load_mnist_split`, one CPU thread, fixed seed, and
writes into ``captum_ext/data``:

- ``bundled_introspection_head.pt``    the network (:meth:`IntrospectiveNetwork.save`)
- ``bundled_introspection_head.json``  the settings, and on the 1,000 held-out digits the
                                       accuracy and ECE (15 bins) of the feed-forward and of
                                       the introspective prediction

``--check`` fits again and compares with the files in the package: the weights bit for bit
and the recorded numbers exactly.

Usage::

    python scripts/train_bundled_introspection.py [--check] [--out-dir DIR] [--quiet]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from captum_ext.bundled import load_bundled_model
from captum_ext.data import load_mnist_split, normalize_digits
from captum_ext.introspection import IntrospectiveNetwork
from captum_ext.metrics import expected_calibration_error

DATA_DIR = Path(__file__).resolve().parents[1] / "captum_ext" / "data"
SEED = 0
HIDDEN = 64
EPOCHS = 15
BATCH = 128
LR = 1e-3


def fit(out: Path) -> dict:
    torch.set_num_threads(1)
    model = load_bundled_model()
    split = load_mnist_split()
    train = normalize_digits(torch.from_numpy(split.train_images)).unsqueeze(1)
    train_labels = torch.from_numpy(split.train_labels).long()
    heldout = normalize_digits(torch.from_numpy(split.heldout_images)).unsqueeze(1)
    heldout_labels = torch.from_numpy(split.heldout_labels).long()
    network = IntrospectiveNetwork(model, hidden_width=HIDDEN)
    network.fit(
        train, train_labels, epochs=EPOCHS, batch_size=BATCH, lr=LR, seed=SEED, progress=False
    )
    network.save(out / "bundled_introspection_head.pt")
    with torch.no_grad():
        forward = torch.softmax(model(heldout), dim=1)
    intro = network.predict_proba(heldout)
    info = {
        "form": network.form,
        "normalize": network.normalize,
        "hidden_width": HIDDEN,
        "epochs": EPOCHS,
        "batch_size": BATCH,
        "lr": LR,
        "seed": SEED,
        "train_digits": int(train.shape[0]),
        "heldout_digits": int(heldout.shape[0]),
        "heldout_accuracy_feed_forward": float(
            (forward.argmax(1) == heldout_labels).double().mean()
        ),
        "heldout_accuracy_introspective": float(
            (intro.argmax(1) == heldout_labels).double().mean()
        ),
        "heldout_ece_feed_forward": float(expected_calibration_error(forward, heldout_labels)),
        "heldout_ece_introspective": float(expected_calibration_error(intro, heldout_labels)),
        "torch": torch.__version__,
    }
    (out / "bundled_introspection_head.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fit again and compare")
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=DATA_DIR,
        help=f"where to write (default: {DATA_DIR}); with --check, what to compare",
    )
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    if not args.check:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        info = fit(args.out_dir)
        if not args.quiet:
            print(json.dumps(info))
        return
    with tempfile.TemporaryDirectory() as folder:
        info = fit(Path(folder))
        fresh = torch.load(Path(folder) / "bundled_introspection_head.pt", weights_only=True)
        packaged = torch.load(args.out_dir / "bundled_introspection_head.pt", weights_only=True)
    recorded = json.loads((args.out_dir / "bundled_introspection_head.json").read_text())
    same_weights = (
        all(torch.equal(fresh["head"][k], packaged["head"][k]) for k in packaged["head"])
        and fresh["config"] == packaged["config"]
    )
    keys = [k for k in info if k != "torch"]
    same_numbers = all(info[k] == recorded[k] for k in keys)
    if same_weights and same_numbers:
        print("check OK")
        return
    print(f"check FAILED: weights equal {same_weights}, numbers equal {same_numbers}")
    sys.exit(1)


if __name__ == "__main__":
    main()
