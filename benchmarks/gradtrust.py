"""GradTrust throughput vs plain inference and vs the published one-image procedure.

resnet18 (random weights, 1000 classes), batch 64 at 224 x 224 by default:
- plain inference: ``model(x)`` under ``torch.no_grad``;
- ``gradtrust(model, x)`` (paper form, closed form on the final linear: no backward pass)
  and ``gradtrust(model, x, form="reference")``;
- the published procedure, one image at a time: forward, MSE of the logits to the uniform
  vector, gradient of the last-layer weight, element-wise square, unbiased variance of each
  row, max / mean (timed on ``--loop-images`` images and scaled to the batch).
The reference form is first checked to equal the published procedure on those images.
Prints one JSON line (ratios: throughput of GradTrust / inference, and speed-up over the
published loop).

    python benchmarks/gradtrust.py [--quick] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torchvision
from _timing import environment, time_interleaved

from captum_ext.metrics import gradtrust


def published_reference(
    model: torch.nn.Module, image: torch.Tensor, full_backward: bool = True
) -> torch.Tensor:
    """One image at a time, as the authors' demo script does.

    ``full_backward`` computes the gradients of every parameter (what ``loss.backward()``
    in a training-style script does); False takes only the last-layer weight's gradient
    (the leanest per-image version).
    """
    logits = model(image)
    uniform = torch.full_like(logits, 1.0 / logits.shape[1])
    loss = torch.nn.functional.mse_loss(logits, uniform)
    wrt = list(model.parameters()) if full_backward else [model.fc.weight]
    grads = torch.autograd.grad(loss, wrt)
    weight_grad = grads[[p is model.fc.weight for p in wrt].index(True)]
    energies = weight_grad.square().var(dim=1, unbiased=True)
    return energies.max() / energies.mean()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--loop-images", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.size, args.loop_images, args.repeats = 16, 112, 4, 3
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval().to(device)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    x = x.to(device)

    subset = x[: args.loop_images]
    ours = gradtrust(model, subset, form="reference")
    theirs = torch.stack(
        [published_reference(model, subset[i : i + 1]) for i in range(len(subset))]
    )
    difference = float(((ours - theirs) / theirs).abs().max())
    print(
        f"reference form vs published procedure: max relative diff {difference:.2e}",
        file=sys.stderr,
    )

    def inference() -> None:
        with torch.no_grad():
            model(x)

    timings = time_interleaved(
        {
            "inference": inference,
            "gradtrust_topk": lambda: gradtrust(model, x),
            "gradtrust_reference": lambda: gradtrust(model, x, form="reference"),
        },
        warmup=1,
        repeats=args.repeats,
        device=device,
    )
    loops = time_interleaved(
        {
            f"published_{kind}": (
                lambda full=full: [
                    published_reference(model, subset[i : i + 1], full) for i in range(len(subset))
                ]
            )
            for kind, full in (("full_backward", True), ("last_layer", False))
        },
        warmup=1,
        repeats=max(1, args.repeats // 2),
        device=device,
    )
    scale = args.batch / args.loop_images
    loop_batch_s = loops["published_full_backward"]["median_s"] * scale
    lean_batch_s = loops["published_last_layer"]["median_s"] * scale
    inference_s = timings["inference"]["median_s"]
    result = {
        "benchmark": "gradtrust",
        "input": [args.batch, 3, args.size, args.size],
        "median_s": {name: t["median_s"] for name, t in timings.items()},
        "published_loop_s_per_batch": loop_batch_s,
        "published_last_layer_loop_s_per_batch": lean_batch_s,
        "published_loop_extrapolated_from": args.loop_images,
        "reference_vs_published_max_rel_diff": difference,
        "ratios": {
            "topk_throughput_vs_inference": inference_s / timings["gradtrust_topk"]["median_s"],
            "reference_throughput_vs_inference": inference_s
            / timings["gradtrust_reference"]["median_s"],
            "reference_speedup_vs_published": loop_batch_s
            / timings["gradtrust_reference"]["median_s"],
            "topk_speedup_vs_published": loop_batch_s / timings["gradtrust_topk"]["median_s"],
            "reference_speedup_vs_published_last_layer_only": lean_batch_s
            / timings["gradtrust_reference"]["median_s"],
        },
        "environment": environment(device),
    }
    for name, value in result["ratios"].items():
        print(f"{name}: {value:.2f}", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
