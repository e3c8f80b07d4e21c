"""Train the network-inversion generator of the bundled digit classifier.

Inverts :func:`captum_ext.bundled.load_bundled_model` with
:class:`captum_ext.inversion.NetworkInversion` (preset ``"inversion"``: vector-matrix
conditioning, KL + CE + cosine + orthogonality; a width-32 :class:`ConditionedGenerator`) on
one CPU thread with a fixed seed, and writes into ``captum_ext/data``:

- ``bundled_generator.pt``    the generator's state dict (``torch.load(..., weights_only=True)``)
- ``bundled_generator.json``  steps, batch size, seed, width, label consistency and mean
                              confidence of 50 samples per class, time, torch version

The tutorial "What does my classifier think a 7 looks like?", the docs and the
``inversion`` section of ``captum-ext report`` load it with
:func:`captum_ext.bundled.load_bundled_inversion` instead of training for minutes.

Usage::

    python scripts/train_bundled_generator.py [--steps 1500] [--checkpoint gen.ckpt]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from captum_ext.bundled import GENERATOR_OPTIONS, bundled_generator, load_bundled_model
from captum_ext.inversion import NetworkInversion, label_consistency, mean_confidence

DATA_DIR = Path(__file__).resolve().parents[1] / "captum_ext" / "data"
SEED = 0
BATCH = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--checkpoint", default=None, help="checkpoint file (resumable)")
    parser.add_argument("--out-dir", default=str(DATA_DIR))
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_bundled_model()
    inversion = NetworkInversion(model, bundled_generator(seed=SEED), batch_size=BATCH, seed=SEED)
    start = time.perf_counter()
    inversion.fit(
        args.steps,
        checkpoint=args.checkpoint,
        checkpoint_every=100,
        resume=args.checkpoint is not None,
    )
    seconds = time.perf_counter() - start
    images, labels = inversion.sample_classes(50, generator=SEED)
    info = {
        "preset": "inversion",
        "steps": args.steps,
        "batch_size": BATCH,
        "seed": SEED,
        **GENERATOR_OPTIONS,
        "label_consistency": label_consistency(model, images, labels),
        "mean_confidence": mean_confidence(model, images, labels),
        "train_seconds": round(seconds, 1),
        "torch": torch.__version__,
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(inversion.generator.state_dict(), out / "bundled_generator.pt")
    (out / "bundled_generator.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info))


if __name__ == "__main__":
    main()
