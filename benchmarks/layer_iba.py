"""Benchmark: LayerIBA's cost against its floor, 10 x (forward + backward to the layer).

Run from the repository root::

    python benchmarks/layer_iba.py               # resnet18 (random weights) 64 x 64 + digits
    python benchmarks/layer_iba.py --quick       # fewer repeats
    python benchmarks/layer_iba.py --device cuda

IBA with the paper's settings (10 steps, 10 noisy copies per example) needs, per example, 10
forward passes of the copies and backward passes from the loss down to the layer. The floor
("baseline") is exactly that work done directly on the same 10 N batch: 10 times a forward
pass of the repeated inputs with a forward hook that substitutes a leaf tensor for the
layer's output, the per-copy cross-entropy, and ``torch.autograd.grad`` of its sum with
respect to that leaf. ``LayerIBA.attribute`` (N examples, so 10 N rows per step) adds the
noise, the blurred mask, the capacity, Adam and one clean forward pass of the N examples for
the target; it skips the last step's backward pass (its update would not change the map).
By default it also runs the layers before the bottleneck on the N examples only (their output
is replaced anyway), which the baseline does not; ``layer_iba_full_copies``
(``reuse_prefix=False``) runs every copy through the whole model, like the reference and the
baseline, and is timed beside it. ``layer_iba_float32_bottleneck`` (``bottleneck_dtype=
torch.float32``) does the bottleneck's own arithmetic in the model's float32 as the reference
does, against the default float64 (``"auto"``); its ratio is reported as the price of the
float64 bottleneck.

Settings: torchvision resnet18 (``weights=None``, seeded, eval mode) at 64 x 64, layer
``layer2``, N = 4; and the bundled digit CNN, layer ``features.7``, N = 16. The two are
timed in interleaved rounds. Prints one JSON line on stdout (ratios ours / baseline, target
<= 1.3); a readable summary goes to stderr.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys

import torch
import torch.nn.functional as F
import torchvision
from _timing import environment, load_average, time_interleaved

from captum_ext.attr import LayerIBA
from captum_ext.bundled import load_bundled_model
from captum_ext.data import load_sample_digits

TARGET = 1.3  # LayerIBA time / baseline time, at most
STEPS = 10
COPIES = 10


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def floor_work(model, layer, x, target, activations):
    """10 x (forward of the 10 N copies with the layer output replaced + backward to it)."""
    repeated = x.repeat_interleave(COPIES, dim=0)
    labels = target.repeat_interleave(COPIES)
    for _ in range(STEPS):
        leaf = activations.repeat_interleave(COPIES, dim=0).requires_grad_(True)
        handle = layer.register_forward_hook(lambda m, a, o, leaf=leaf: leaf)
        try:
            loss = F.cross_entropy(model(repeated), labels, reduction="sum")
        finally:
            handle.remove()
        torch.autograd.grad(loss, leaf)


def setting(name, model, layer_name, x, device, args):
    model = model.to(device).eval()
    x = x.to(device)
    layer = model.get_submodule(layer_name)
    with torch.no_grad():
        target = model(x).argmax(1)
        seen = []
        handle = layer.register_forward_hook(lambda m, a, o: seen.append(o.detach().clone()))
        model(x)
        handle.remove()
    activations = seen[0]
    iba = LayerIBA(model, layer_name)
    iba.estimate(x)

    fns = {
        "layer_iba": lambda: iba.attribute(x, target=target, generator=args.seed),
        "layer_iba_full_copies": lambda: iba.attribute(
            x, target=target, generator=args.seed, reuse_prefix=False
        ),
        "layer_iba_float32_bottleneck": lambda: iba.attribute(
            x, target=target, generator=args.seed, bottleneck_dtype=torch.float32
        ),
        "baseline_10x_fwd_bwd_to_layer": lambda: floor_work(model, layer, x, target, activations),
    }
    timings = time_interleaved(
        fns, warmup=1, repeats=args.repeats, min_repeats=3, budget_s=args.budget_s, device=device
    )
    ours = timings["layer_iba"]["median_s"]
    full = timings["layer_iba_full_copies"]["median_s"]
    base = timings["baseline_10x_fwd_bwd_to_layer"]["median_s"]
    ratio = ours / base
    log(
        f"[{name}] N={x.shape[0]}: LayerIBA {ours * 1e3:.1f} ms (full copies {full * 1e3:.1f} "
        f"ms), baseline {base * 1e3:.1f} ms, ratio {ratio:.3f} / {full / base:.3f} "
        f"({timings['layer_iba']['repeats']} rounds); float64 / float32 bottleneck "
        f"{ours / timings['layer_iba_float32_bottleneck']['median_s']:.3f}"
    )
    return {
        "batch": int(x.shape[0]),
        "rows_per_step": int(x.shape[0]) * COPIES,
        "input_hw": list(x.shape[2:]),
        "layer": layer_name,
        "median_ms": {k: round(v["median_s"] * 1e3, 3) for k, v in timings.items()},
        "min_ms": {k: round(v["min_s"] * 1e3, 3) for k, v in timings.items()},
        "repeats": timings["layer_iba"]["repeats"],
        "ratio_ours_over_baseline": round(ratio, 4),
        "ratio_ours_over_baseline_min": round(
            timings["layer_iba"]["min_s"] / timings["baseline_10x_fwd_bwd_to_layer"]["min_s"], 4
        ),
        "ratio_full_copies_over_baseline": round(full / base, 4),
        "ratio_full_copies_over_baseline_min": round(
            timings["layer_iba_full_copies"]["min_s"]
            / timings["baseline_10x_fwd_bwd_to_layer"]["min_s"],
            4,
        ),
        "ratio_float64_over_float32_bottleneck": round(
            ours / timings["layer_iba_float32_bottleneck"]["median_s"], 4
        ),
        "target_max": TARGET,
        "target_met": ratio <= TARGET,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    args.repeats = 3 if args.quick else 7
    args.budget_s = 20.0 if args.quick else 90.0
    device = torch.device(args.device)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    load_before = load_average()

    torch.manual_seed(args.seed)
    resnet = torchvision.models.resnet18(weights=None)
    gen = torch.Generator().manual_seed(args.seed)
    x_resnet = torch.randn(4, 3, 64, 64, generator=gen)
    images, _ = load_sample_digits()
    results = {
        "resnet18_64px_layer2": setting("resnet18", resnet, "layer2", x_resnet, device, args),
        "digits_features7": setting(
            "digits", load_bundled_model(), "features.7", images[:16], device, args
        ),
    }
    out = {
        "benchmark": "layer_iba",
        "started_utc": started,
        "seed": args.seed,
        "steps": STEPS,
        "n_noise": COPIES,
        "results": results,
        "target_met": all(r["target_met"] for r in results.values()),
        "load_before": load_before,
        "environment": environment(device),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
