"""VOICE in one pass vs the published per-class loop, side by side in one process.

The reference procedure computes one contrastive explanation per class Q with its own
forward and backward pass, post-processes it (ReLU, upsample, min-max) and takes the
variance. VOICE gets every contrast from one forward pass and the shared batched backward.

1. Grad-CAM, all 999 contrasts of resnet18 (random weights), one 224 x 224 image: VOICE vs
   the loop (timed on ``--loop-classes`` classes and extrapolated linearly to 1000 maps).
2. Guided Backprop, top-20 contrasts: VOICE vs 21 Captum GuidedBackprop calls.
Each part first checks that both give the same uncertainty on the same contrast classes.
Prints one JSON line of timings and ratios on stdout (details on stderr).

    python benchmarks/voice.py [--quick] [--device cuda] [--before DIR]

``--before DIR``: DIR holds an older copy of the package renamed ``captum_ext_old`` (e.g.
``git archive <commit> captum_ext | tar -x -C DIR`` and a rename); its VOICE, the current
VOICE and the all-class ContrastCAM are then timed in interleaved rounds (Grad-CAM and
Grad-CAM++, all 999 contrasts), with their largest differences. ``benchmarks/peers.py`` puts
VOICE beside every other method.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torchvision
from _timing import environment, time_call, time_each, time_interleaved
from captum.attr import GuidedBackprop

from captum_ext.attr import VOICE, ContrastCAM, Contrastive, GradCAM, LayerGradCamPlusPlus
from captum_ext.attr.voice import _variance


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def minmax(maps: torch.Tensor) -> torch.Tensor:
    flat = maps.flatten(1)
    low, high = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    scaled = torch.where(high > low, (flat - low) / (high - low).clamp(min=1e-30), 0.0)
    return scaled.view_as(maps)


def loop_uncertainty(one_map, classes: list[int]) -> torch.Tensor:
    """The published order: per class a map, ReLU + min-max, then variance, then min-max."""
    maps = torch.stack([minmax(torch.relu(one_map(q))) for q in classes])
    count = torch.tensor([float(len(classes))], device=maps.device)
    return minmax(_variance(maps.sum(0), maps.square().sum(0), count))


def part_gradcam(model, x, args, device) -> dict:
    prediction = int(model(x).argmax())
    contrast_cam = ContrastCAM(model, "layer4")

    def one_map(q: int) -> torch.Tensor:
        return contrast_cam.attribute(x, contrast=q, upsample_to_input=True)[:, 0]

    classes = [q for q in range(0, 1000, 1000 // args.loop_classes) if q != prediction]
    classes = classes[: args.loop_classes]
    voice = VOICE(GradCAM(model, "layer4"))
    subset = voice.attribute(x, contrasts=classes, max_batch=args.max_batch).uncertainty
    reference = loop_uncertainty(one_map, classes)
    difference = float((subset[:, 0] - reference).abs().max())
    log(f"gradcam: max |VOICE - loop| on {len(classes)} contrasts = {difference:.2e}")
    fast = time_call(
        lambda: voice.attribute(x, max_batch=args.max_batch),
        warmup=1,
        repeats=args.repeats,
        device=device,
    )
    loop = time_each([lambda q=q: one_map(q) for q in classes], warmup=1, device=device)
    loop_total = loop["mean_s"] * 1000  # 999 contrasts + the explanation of P
    log(
        f"gradcam: VOICE all 999 contrasts {fast['median_s'] * 1e3:.0f} ms; loop "
        f"{loop['mean_s'] * 1e3:.1f} ms per class -> {loop_total:.1f} s for 1000 maps"
    )
    return {
        "voice_all_s": fast["median_s"],
        "loop_per_class_s": loop["mean_s"],
        "loop_extrapolated_s": loop_total,
        "loop_extrapolated_from": len(classes),
        "max_abs_diff_vs_loop": difference,
        "speedup": loop_total / fast["median_s"],
    }


def part_guided(model, x, args, device) -> dict:
    k = 20
    order = model(x).argsort(1, descending=True)[0].tolist()
    contrasts = order[1 : k + 1]
    guided = Contrastive(GuidedBackprop, model)

    def one_map(q: int) -> torch.Tensor:
        return guided.attribute(x, contrast=q)

    explain = GuidedBackprop(model)
    voice = VOICE(GuidedBackprop(model))
    fast_result = voice.attribute(x, contrasts=k, max_batch=args.max_batch)
    reference = loop_uncertainty(one_map, contrasts)
    difference = float((fast_result.uncertainty - reference).abs().max())
    log(f"guided backprop: max |VOICE - loop| on top-{k} = {difference:.2e}")
    fast = time_call(
        lambda: voice.attribute(x, contrasts=k, max_batch=args.max_batch),
        warmup=1,
        repeats=args.repeats,
        device=device,
    )

    def published() -> None:
        explain.attribute(x, target=order[0])
        loop_uncertainty(one_map, contrasts)

    loop = time_call(published, warmup=1, repeats=max(1, args.repeats // 2), device=device)
    log(
        f"guided backprop: VOICE top-{k} {fast['median_s'] * 1e3:.0f} ms; loop "
        f"{loop['median_s'] * 1e3:.0f} ms"
    )
    return {
        "voice_topk_s": fast["median_s"],
        "loop_s": loop["median_s"],
        "k": k,
        "max_abs_diff_vs_loop": difference,
        "speedup": loop["median_s"] / fast["median_s"],
    }


def part_before_after(model, x, args, device) -> dict:
    sys.path.insert(0, args.before)
    old = __import__("captum_ext_old.attr", fromlist=["VOICE"])
    out = {}
    for name, kind in (("gradcam", "GradCAM"), ("gradcam++", "LayerGradCamPlusPlus")):
        new_method = GradCAM if kind == "GradCAM" else LayerGradCamPlusPlus
        before = old.VOICE(getattr(old, kind)(model, "layer4"))
        after = VOICE(new_method(model, "layer4"))
        weighting = "gradcam" if kind == "GradCAM" else "gradcam++"
        cam = ContrastCAM(model, "layer4", weighting=weighting)
        a, b = before.attribute(x), after.attribute(x)
        fields = ("uncertainty", "explanation", "contrast", "iou", "snr")
        timings = time_interleaved(
            {
                "before": lambda v=before: v.attribute(x),
                "after": lambda v=after: v.attribute(x),
                "contrast_cam_all": lambda c=cam: c.attribute(x, contrast="all"),
            },
            warmup=1,
            repeats=args.repeats,
            device=device,
        )
        out[name] = {
            **{k: {"min_s": t["min_s"], "median_s": t["median_s"]} for k, t in timings.items()},
            "max_abs_diff": {f: float((getattr(a, f) - getattr(b, f)).abs().max()) for f in fields},
        }
        log(f"before/after {name}: {json.dumps(out[name])}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="smaller input, fewer repeats")
    parser.add_argument("--loop-classes", type=int, default=20)
    parser.add_argument("--max-batch", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--before", default=None, help="folder holding captum_ext_old")
    args = parser.parse_args()
    device = torch.device(args.device)
    size = 112 if args.quick else 224
    if args.quick:
        args.repeats, args.loop_classes = 2, 8
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval().to(device)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    result = {
        "benchmark": "voice",
        "input": [1, 3, size, size],
        "gradcam_all_contrasts": part_gradcam(model, x, args, device),
        "guided_backprop_top20": part_guided(model, x, args, device),
        "environment": environment(device),
    }
    if args.before:
        result["before_after"] = part_before_after(model, x, args, device)
    result["ratios"] = {
        "gradcam_all_speedup": result["gradcam_all_contrasts"]["speedup"],
        "guided_top20_speedup": result["guided_backprop_top20"]["speedup"],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
