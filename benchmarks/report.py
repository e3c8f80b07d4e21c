"""Time the default ``captum-ext report`` of a model of your own (issue 19).

Builds a torchvision resnet18 with random weights (``weights=None``: no download), writes 8
random 224 x 224 images to a temporary folder, runs :func:`captum_ext.viz.build_report` with
the default sections for a model of your own, and prints one JSON line: the seconds per
section and the total. Usage::

    python benchmarks/report.py [--images 8] [--size 224] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--sections", default=None, help="comma-separated; default: the CLI's")
    args = parser.parse_args(argv)

    import numpy as np
    import torch
    import torchvision
    from PIL import Image

    from captum_ext.viz.build import ReportConfig, build_report

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        rng = np.random.default_rng(0)
        for i in range(args.images):
            pixels = rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
            Image.fromarray(pixels, "RGB").save(folder / f"{i:02d}.png")
        weights = Path(tmp) / "r18.pt"
        torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
        config = ReportConfig(
            model="torchvision.models:resnet18",
            weights=str(weights),
            images=str(folder),
            out=str(Path(tmp) / "report"),
            sections=args.sections.split(",") if args.sections else None,
            progress=False,
        )
        started = time.perf_counter()
        result = build_report(config)
        total = time.perf_counter() - started
    record = {
        "images": args.images,
        "size": args.size,
        "threads": torch.get_num_threads(),
        "seconds": {name: round(seconds, 2) for name, seconds in result.timings},
        "total_s": round(total, 2),
    }
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
