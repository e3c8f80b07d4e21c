"""VOICE's "IoU is higher on wrong predictions" on natural images and a deeper network.

The digit benchmark (``benchmarks/voice_claims.py``) found the claim does not hold on a 2-conv
CNN at 98 % accuracy. The paper measured ImageNet networks; nothing can be downloaded here, so
this script builds the closest offline set-up:

- data: 10 photographs shipped with scikit-image (astronaut, brick, camera, coffee, coins,
  grass, gravel, immunohistochemistry, moon, rocket), in grey (colour would give the class
  away). A class is "which photograph is this crop from?". Training crops (64 x 64, random
  position, scale 0.6-1.4, flips) come from the top 70 % of each photograph, test crops from
  the bottom 30 %: a held-out region, so the errors are real generalisation errors;
- network: ``--arch vgg`` (8 convolutions, 4 stages, batch norm; Grad-CAM at the last
  convolution, 8 x 8) or ``--arch resnet18`` (torchvision's, weights=None; Grad-CAM at
  ``layer3``, 4 x 4), trained here for ``--epochs`` with Adam;
- read-outs: VOICE (Grad-CAM, all 9 contrasts) on the test crops, clean and with Gaussian
  noise; mean IoU / SNR on right and wrong predictions, the AUROC of IoU for telling wrong from
  right (0.5 = no signal, > 0.5 = higher on wrong, the paper's claim), with a bootstrap 95 %
  interval.

Prints tables on stderr and one JSON line on stdout. Nothing is tuned to make the claim hold.

    python benchmarks/voice_natural.py [--arch vgg] [--epochs 6] [--train 4000] [--test 1000]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from captum_ext.attr import VOICE, GradCAM
from captum_ext.metrics import auroc

PHOTOGRAPHS = (
    "astronaut",
    "brick",
    "camera",
    "coffee",
    "coins",
    "grass",
    "gravel",
    "immunohistochemistry",
    "moon",
    "rocket",
)
SIZE = 64
TRAIN_SHARE = 0.7


def grey_photographs() -> list[torch.Tensor]:
    import skimage.color
    import skimage.data

    photos = []
    for name in PHOTOGRAPHS:
        image = np.asarray(getattr(skimage.data, name)(), dtype=np.float64)
        if image.ndim == 3:
            image = skimage.color.rgb2gray(image[..., :3] / 255.0)
        else:
            image = image / 255.0
        photos.append(torch.from_numpy(image).float())
    return photos


def crops(
    photos: list[torch.Tensor], n: int, train: bool, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` crops per class in turn, from the top 70 % (train) or bottom 30 % (test)."""
    images, labels = [], []
    for i in range(n):
        label = i % len(photos)
        photo = photos[label]
        height, width = photo.shape
        cut = int(height * TRAIN_SHARE)
        top, bottom = (0, cut) if train else (cut, height)
        scale = 0.6 + 0.8 * float(torch.rand((), generator=generator))
        side = min(int(SIZE * scale), bottom - top, width)
        y = top + int(torch.randint(0, bottom - top - side + 1, (), generator=generator))
        x = int(torch.randint(0, width - side + 1, (), generator=generator))
        patch = photo[y : y + side, x : x + side][None, None]
        patch = F.interpolate(patch, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        if float(torch.rand((), generator=generator)) < 0.5:
            patch = patch.flip(-1)
        images.append(patch[0])
        labels.append(label)
    stacked = torch.stack(images)
    stacked = (stacked - 0.45) / 0.25
    return stacked.expand(-1, 3, -1, -1).contiguous(), torch.tensor(labels)


def vgg_net(classes: int) -> nn.Module:
    def stage(cin: int, cout: int) -> list[nn.Module]:
        return [
            nn.Conv2d(cin, cout, 3, padding=1),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
            nn.Conv2d(cout, cout, 3, padding=1),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
        ]

    features = nn.Sequential(
        *stage(3, 32),
        nn.MaxPool2d(2),
        *stage(32, 64),
        nn.MaxPool2d(2),
        *stage(64, 128),
        nn.MaxPool2d(2),
        *stage(128, 128),
    )
    return nn.Sequential(
        features, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.3), nn.Linear(128, classes)
    )


def build(arch: str, classes: int) -> tuple[nn.Module, str]:
    if arch == "vgg":
        return vgg_net(classes), "0.22"  # the last ReLU: 8 x 8 at 64 x 64 inputs
    import torchvision

    return torchvision.models.resnet18(weights=None, num_classes=classes), "layer3"


def train(model, images, labels, epochs: int, generator: torch.Generator) -> None:
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        total = 0.0
        for start in range(0, len(images), 64):
            batch = order[start : start + 64]
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(batch)
        print(f"epoch {epoch + 1}: loss {total / len(images):.3f}", file=sys.stderr)
    model.eval()


def bootstrap_auroc(scores: torch.Tensor, wrong: torch.Tensor, rounds: int = 500) -> list[float]:
    rng = np.random.default_rng(0)
    values = []
    n = len(scores)
    for _ in range(rounds):
        pick = torch.from_numpy(rng.integers(0, n, n))
        w = wrong[pick]
        if w.all() or not w.any():
            continue
        values.append(auroc(scores[pick][w], scores[pick][~w]))
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=("vgg", "resnet18"), default="vgg")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--noise", default="0,0.5,1", help="noise std in normalised units")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    photos = grey_photographs()
    train_images, train_labels = crops(photos, args.train, True, generator)
    test_images, test_labels = crops(photos, args.test, False, generator)
    model, layer = build(args.arch, len(PHOTOGRAPHS))
    started = time.perf_counter()
    train(model, train_images, train_labels, args.epochs, generator)
    seconds = time.perf_counter() - started
    voice = VOICE(GradCAM(model, layer))
    report: dict = {
        "arch": args.arch,
        "layer": layer,
        "epochs": args.epochs,
        "train_crops": args.train,
        "test_crops": args.test,
        "seed": args.seed,
        "train_seconds": round(seconds, 1),
        "settings": {},
    }
    print(
        "| noise std | accuracy | wrong | mean IoU right | mean IoU wrong | "
        "AUROC of IoU (wrong vs right) [95 % CI] | mean SNR right | mean SNR wrong |",
        file=sys.stderr,
    )
    print("|---|---|---|---|---|---|---|---|", file=sys.stderr)
    for std in (float(v) for v in args.noise.split(",")):
        noisy = test_images + std * torch.randn(
            test_images.shape, generator=torch.Generator().manual_seed(args.seed + 1)
        )
        parts: dict[str, list[torch.Tensor]] = {"iou": [], "snr": [], "prediction": []}
        for start in range(0, len(noisy), 200):
            result = voice.attribute(noisy[start : start + 200])
            for key in parts:
                parts[key].append(getattr(result, key).detach())
        iou, snr, prediction = (torch.cat(parts[k]) for k in ("iou", "snr", "prediction"))
        wrong = prediction != test_labels
        # P(IoU of a wrong prediction > IoU of a right one): the paper's claim is > 0.5
        separation = (
            auroc(iou[wrong].double(), iou[~wrong].double())
            if wrong.any() and not wrong.all()
            else float("nan")
        )
        interval = bootstrap_auroc(iou.double(), wrong) if wrong.sum() >= 5 else [None, None]
        row = {
            "accuracy": float((~wrong).double().mean()),
            "wrong": int(wrong.sum()),
            "iou_right": float(iou[~wrong].mean()) if (~wrong).any() else None,
            "iou_wrong": float(iou[wrong].mean()) if wrong.any() else None,
            "snr_right": float(snr[~wrong].mean()) if (~wrong).any() else None,
            "snr_wrong": float(snr[wrong].mean()) if wrong.any() else None,
            "auroc_iou_wrong": separation,
            "auroc_ci95": interval,
        }
        report["settings"][str(std)] = row
        ci = "n/a" if interval[0] is None else f"[{interval[0]:.3f}, {interval[1]:.3f}]"
        fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
        print(
            f"| {std:g} | {row['accuracy']:.3f} | {row['wrong']} | {fmt(row['iou_right'])} | "
            f"{fmt(row['iou_wrong'])} | {separation:.3f} {ci} | {fmt(row['snr_right'])} | "
            f"{fmt(row['snr_wrong'])} |",
            file=sys.stderr,
        )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
