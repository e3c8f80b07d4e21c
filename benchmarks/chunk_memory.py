"""Peak memory of the gradient engine's automatic chunks, against the former rule that
counted only the chunk's gradients (audit 42).

Two engines chunk their work by an estimate of its memory:

- the class engine (CAMs, VOICE): classes per batched backward. Former rule: 64 classes,
  fewer only where their gradients alone passed ~1 GiB (on these inputs 64, reproduced by
  ``max_batch=64``). Now: the backward pass's working memory is counted as well.
- per-example parameter gradients (GradTrust at a layer): examples per vmapped chunk.
  Former rule: as many examples as their gradients fit in 256 MiB (reproduced by removing
  the module-output count; the gradients are counted twice, as now, where the former rule
  counted them once, so its chunks and peaks were if anything larger than shown). Now:
  the first example measures the forward and backward passes' module outputs, which the
  other chunks count.
- PathwayGradient's integrated scores: rows (example, step) per forward and backward pass.
  Former rule: all ``n_steps x N`` rows at once (reproduced by ``internal_batch_size``
  equal to that). Now: as many rows as keep the module outputs measured on the first pass,
  and their gradients, near 1 GiB.

Each configuration runs in a fresh subprocess (peak RSS from ``getrusage``, minus the RSS
after the model and images were built); each also records the scores, so that the two
rules are shown to give the same numbers. Model: torchvision's resnet18 with random
weights (seed 0), 224 x 224 inputs (seed 1), CPU, one thread.

    python benchmarks/chunk_memory.py [--images 4] [--classes 100] [--cases ...]

Prints a markdown table and, last, one JSON line with the ratios (former / now).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, warnings
import torch, torchvision
torch.set_num_threads(1)
warnings.simplefilter("ignore")
import captum_ext._utils.batched_grad as engine

case, rule, n, classes = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
model = torchvision.models.resnet18(weights=None, num_classes=classes).eval()
x = torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(1))
if rule == "former" and case.startswith("gradtrust"):
    # the former rule: chunks by the per-example gradients' bytes alone (counted twice, as
    # now: the former rule counted them once, so its chunks were up to twice these)
    class Nothing:
        bytes = 0

    class Uncounted:
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return Nothing()

        def __exit__(self, *exc):
            return False

    engine.counted_output_bytes = Uncounted
chunks = []  # the class engine's chunk (classes per backward)
original = engine.auto_chunk
engine.auto_chunk = lambda *a, **k: chunks.append(original(*a, **k)) or chunks[-1]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
if case == "voice_saliency":
    from captum.attr import Saliency
    from captum_ext.attr import VOICE

    extra = {"max_batch": 64} if rule == "former" else {}
    result = VOICE(Saliency(model)).attribute(x, **extra)
    values = result.iou.tolist()
elif case == "pathway_integrated":
    from captum_ext.attr import PathwayGradient

    extra = {"internal_batch_size": 11 * n} if rule == "former" else {}
    attr = PathwayGradient(model).attribute(x, target=0, score="integrated", n_steps=11, **extra)
    values = [*attr.sum((1, 2, 3)).tolist(), *attr.abs().sum((1, 2, 3)).tolist()]
else:
    from captum_ext.metrics import gradtrust

    layer = case.split(":", 1)[1]
    values = gradtrust(model, x, layer=layer, log=True).tolist()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"peak_mib": round(peak - base), "values": values, "chunks": chunks[:1]}))
"""

CASES = (
    "voice_saliency",
    "gradtrust:layer1.0.conv1",
    "gradtrust:layer4.1.conv2",
    "pathway_integrated",
)


def run(case: str, rule: str, n: int, classes: int) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, case, rule, str(n), str(classes)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if done.returncode:
        raise RuntimeError(f"{case} / {rule} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument(
        "--cases", nargs="+", choices=CASES, default=list(CASES), help="default: every case"
    )
    args = parser.parse_args()
    rows = {}
    for case in args.cases:
        former = run(case, "former", args.images, args.classes)
        now = run(case, "now", args.images, args.classes)
        same = max(abs(a - b) for a, b in zip(former["values"], now["values"], strict=True))
        rows[case] = {
            "former_mib": former["peak_mib"],
            "now_mib": now["peak_mib"],
            "ratio": round(former["peak_mib"] / max(now["peak_mib"], 1), 2),
            "max_abs_difference": same,
            "chunk_now": now["chunks"],
        }
    print(f"\n{args.images} images, 224 px, resnet18, {args.classes} classes, CPU, one thread")
    print("| case | former rule (MiB) | now (MiB) | former / now | max abs difference |")
    print("|---|---|---|---|---|")
    for case, row in rows.items():
        print(
            f"| {case} | {row['former_mib']} | {row['now_mib']} | {row['ratio']} | "
            f"{row['max_abs_difference']:.1e} |"
        )
    print(
        json.dumps(
            {
                "benchmark": "chunk_memory",
                "images": args.images,
                "classes": args.classes,
                "rows": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
