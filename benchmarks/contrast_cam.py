"""Benchmark: ContrastCAM against Captum's LayerGradCam and pytorch-grad-cam, in one process.

Run from the repository root::

    python benchmarks/contrast_cam.py              # full setting (a few minutes on 2 CPU cores)
    python benchmarks/contrast_cam.py --quick      # smaller setting, under a minute
    python benchmarks/contrast_cam.py --device cuda

Model: torchvision resnet18 with random weights (``weights=None``, seeded, eval mode), layer
``layer4``, inputs of 224 x 224.

1. One map per example (batch 16): ``ContrastCAM(model, "layer4").attribute(x)`` (contrast =
   runner-up class) against ``captum.attr.LayerGradCam(model, model.layer4)`` with the predicted
   class, and pytorch-grad-cam's ``GradCAM`` with ``ClassifierOutputTarget``. The three are timed
   in interleaved rounds. pytorch-grad-cam also upsamples and min-max normalises its maps, so
   ContrastCAM with ``upsample_to_input=True, normalize="minmax"`` is timed as well.
2. All 1000 contrast classes (batch 1, then batch 16 when the time budget allows):
   ``attribute(x, contrast="all")`` for several ``max_batch`` against the published procedure,
   one ``attribute(x, contrast=q)`` call per class q. The loop is timed on a subset of classes
   spread over 0..999 and extrapolated linearly to all classes (``loop_extrapolated_from``);
   the all-class maps are compared with the loop's maps on that subset.

Prints one JSON line on stdout; progress and a readable summary go to stderr.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from typing import Any

import torch
import torchvision
from _timing import CpuShare, environment, load_average, time_call, time_each, time_interleaved
from captum.attr import LayerGradCam
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from captum_ext._utils.batched_grad import auto_chunk
from captum_ext.attr import ContrastCAM

LAYER = "layer4"
SWEEP = (16, 32, 64, 128, 250)
TARGET_SINGLE = 1.2  # ContrastCAM time / LayerGradCam time, at most
TARGET_ALL = 100.0  # per-class loop time / all-class time, at least


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build_model(seed: int, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.resnet18(weights=None).eval().to(device)


def make_input(batch: int, size: int, seed: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=generator).to(device)


def ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def max_abs(tensor: torch.Tensor) -> float:
    return float(tensor.detach().abs().max()) if tensor.numel() else 0.0


def layer_activation(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    captured = []
    handle = getattr(model, LAYER).register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return captured[0]


def bench_single(model, x, device, args) -> dict[str, Any]:
    """Part 1: one map per example, ours against the two Grad-CAM baselines."""
    with torch.no_grad():
        logits = model(x)
    pred = logits.argmax(dim=1)
    runner_up = logits.topk(2, dim=1).indices[:, 1]
    targets = [ClassifierOutputTarget(int(c)) for c in pred]

    def ours():
        return ContrastCAM(model, LAYER).attribute(x)

    def layer_grad_cam():
        return LayerGradCam(model, model.layer4).attribute(x, target=pred)

    def pytorch_grad_cam():
        with GradCAM(model=model, target_layers=[model.layer4]) as cam:
            return cam(input_tensor=x, targets=targets)

    def ours_upsampled():
        return ContrastCAM(model, LAYER).attribute(x, upsample_to_input=True, normalize="minmax")

    def forward_no_grad():
        with torch.no_grad():
            return model(x)

    fns = {
        "contrast_cam": ours,
        "layer_grad_cam": layer_grad_cam,
        "pytorch_grad_cam": pytorch_grad_cam,
        "contrast_cam_upsample_minmax": ours_upsampled,
        "forward_no_grad": forward_no_grad,
    }
    log(f"[single] batch {x.shape[0]}: timing {', '.join(fns)} in interleaved rounds")
    timings = time_interleaved(
        fns,
        warmup=args.warmup,
        repeats=args.repeats,
        min_repeats=3,
        budget_s=args.round_budget_s,
        device=device,
    )
    model.zero_grad(set_to_none=True)  # pytorch-grad-cam's backward fills the parameters' .grad

    # Correctness: ContrastCAM = Captum's LayerGradCam applied to the per-example cross-entropy
    # with the contrast class as label (the spec's "contrastive wrapper").
    ours_maps = ours()
    reference = LayerGradCam(
        lambda inp: -torch.log_softmax(model(inp), dim=1), model.layer4
    ).attribute(x, target=runner_up, relu_attributions=True)
    diff = max_abs(ours_maps - reference)

    times = {name: ms(t["median_s"]) for name, t in timings.items()}
    fastest = {name: ms(t["min_s"]) for name, t in timings.items()}
    ratio_min = timings["contrast_cam"]["min_s"] / timings["layer_grad_cam"]["min_s"]
    ratio_lgc = timings["contrast_cam"]["median_s"] / timings["layer_grad_cam"]["median_s"]
    ratio_pgc = timings["contrast_cam"]["median_s"] / timings["pytorch_grad_cam"]["median_s"]
    ratio_post = (
        timings["contrast_cam_upsample_minmax"]["median_s"]
        / timings["pytorch_grad_cam"]["median_s"]
    )
    return {
        "batch": int(x.shape[0]),
        "input_hw": list(x.shape[2:]),
        "layer": LAYER,
        "median_ms": times,
        "min_ms": fastest,
        "repeats": timings["contrast_cam"]["repeats"],
        "ratio_ours_over_layergradcam": round(ratio_lgc, 4),
        "ratio_ours_over_layergradcam_min": round(ratio_min, 4),
        "ratio_ours_over_pytorch_grad_cam": round(ratio_pgc, 4),
        "ratio_ours_upsample_minmax_over_pytorch_grad_cam": round(ratio_post, 4),
        "target_ours_over_layergradcam_max": TARGET_SINGLE,
        "target_met": ratio_lgc <= TARGET_SINGLE,
        "check_max_abs_diff_vs_captum_layergradcam_on_cross_entropy": diff,
        "check_map_scale": max_abs(reference),
    }


def loop_subset(num_classes: int, count: int) -> list[int]:
    count = max(1, min(count, num_classes))
    picked = torch.linspace(0, num_classes - 1, count).round().long().unique()
    return [int(q) for q in picked]


def bench_all(model, x, device, args, *, loop_classes: int, repeats: int) -> dict[str, Any]:
    """Part 2: all contrast classes in one call against one call per class."""
    cam = ContrastCAM(model, LAYER)
    with torch.no_grad():
        num_classes = model(x).shape[1]
    default_chunk = auto_chunk(None, num_classes, (layer_activation(model, x),))
    batch = int(x.shape[0])

    settings = [(str(mb), mb) for mb in SWEEP]
    if default_chunk not in SWEEP:
        settings.append(("default", None))
    outputs: dict[str, torch.Tensor] = {}
    sweep: dict[str, float] = {}
    sweep_min: dict[str, float] = {}
    for label, max_batch in settings:
        # The default chunk size is timed through the default call (max_batch=None).
        argument = None if max_batch == default_chunk else max_batch

        def call(label=label, argument=argument):
            outputs[label] = cam.attribute(x, contrast="all", max_batch=argument)

        timing = time_call(
            call,
            warmup=1,
            repeats=repeats,
            min_repeats=2,
            budget_s=args.setting_budget_s,
            device=device,
        )
        sweep[label] = ms(timing["median_s"])
        sweep_min[label] = ms(timing["min_s"])
        shown = "default" if argument is None else f"max_batch={max_batch}"
        log(f"[all b{batch}] {shown:>14}: {sweep[label]:10.1f} ms ({timing['repeats']} runs)")

    default_label = str(default_chunk) if default_chunk in SWEEP else "default"
    best_label = min((label for label, _ in settings), key=lambda label: sweep[label])
    full = outputs[default_label]
    if tuple(full.shape) != (batch, num_classes, *full.shape[2:]):
        raise RuntimeError(f"unexpected all-class output shape {tuple(full.shape)}")
    across_settings = max(max_abs(out - full) for out in outputs.values())

    classes = loop_subset(num_classes, loop_classes)
    loop_maps: dict[int, torch.Tensor] = {}

    def per_class(q: int):
        def call():
            loop_maps[q] = cam.attribute(x, contrast=q)

        return call

    log(f"[all b{batch}] loop: one call per class on {len(classes)} classes")
    loop = time_each([per_class(q) for q in classes], warmup=1, device=device)
    # Linear extrapolation with the median per-class time (robust to a stray slow call).
    loop_total = loop["median_s"] * num_classes
    diff = max(max_abs(full[:, q] - loop_maps[q][:, 0]) for q in classes)
    scale = max(max_abs(full[:, q]) for q in classes)

    ratio_best = loop_total / (sweep[best_label] / 1000.0)
    ratio_default = loop_total / (sweep[default_label] / 1000.0)
    log(
        f"[all b{batch}] loop {ms(loop['median_s']):.1f} ms/class -> {loop_total:.1f} s for "
        f"{num_classes} (extrapolated); all-class best {sweep[best_label]:.1f} ms "
        f"(max_batch={best_label}), ratio {ratio_best:.0f}x; max |diff| {diff:.3g}"
    )
    return {
        "batch": batch,
        "input_hw": list(x.shape[2:]),
        "num_classes": num_classes,
        "all_median_ms_by_max_batch": sweep,
        "all_min_ms_by_max_batch": sweep_min,
        "default_max_batch": default_chunk,
        "all_default_ms": sweep[default_label],
        "best_max_batch": int(best_label) if best_label.isdigit() else best_label,
        "all_best_ms": sweep[best_label],
        "loop_ms_per_class_median": ms(loop["median_s"]),
        "loop_ms_per_class_mean": ms(loop["mean_s"]),
        "loop_ms_per_class_min": ms(min(loop["times_s"])),
        "loop_ms_extrapolated": ms(loop_total),
        "loop_extrapolation": f"median per-class time x {num_classes}",
        "loop_extrapolated_from": len(classes),
        "loop_classes": classes,
        "ratio_loop_over_all_best": round(ratio_best, 2),
        "ratio_loop_over_all_default": round(ratio_default, 2),
        "target_ratio_min": TARGET_ALL,
        "target_met": ratio_best >= TARGET_ALL,
        "target_met_with_default": ratio_default >= TARGET_ALL,
        "check_max_abs_diff_vs_loop": diff,
        "check_map_scale": scale,
        "check_max_abs_diff_across_max_batch": across_settings,
    }


def profile_all(model, x, device) -> list[dict[str, Any]]:
    """Operators that take the time of one all-class call (default chunk size)."""
    from torch.profiler import ProfilerActivity, profile

    cam = ContrastCAM(model, LAYER)
    cam.attribute(x, contrast="all")
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        cam.attribute(x, contrast="all")
    averages = prof.key_averages()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    log(averages.table(sort_by=key, row_limit=15))
    rows = sorted(averages, key=lambda event: getattr(event, key), reverse=True)[:12]
    return [
        {
            "op": event.key,
            "count": event.count,
            "self_ms": round(getattr(event, key) / 1000.0, 3),
            "total_ms": round(event.cpu_time_total / 1000.0, 3),
        }
        for event in rows
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--quick", action="store_true", help="smaller setting, under a minute")
    parser.add_argument("--batch", type=int, default=None, help="part 1 batch (16; quick: 4)")
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds in part 1")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds in part 1")
    parser.add_argument(
        "--loop-classes", type=int, default=None, help="classes of the timed loop (20; quick: 10)"
    )
    parser.add_argument(
        "--loop-classes-batch16", type=int, default=10, help="classes of the batch-16 loop"
    )
    parser.add_argument("--skip-batch16", action="store_true", help="all classes at batch 1 only")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=270.0,
        help="skip the batch-16 all-class part if the "
        "estimate would take the script past this many seconds",
    )
    parser.add_argument("--profile", action="store_true", help="profile one all-class call")
    parser.add_argument("--json-out", default=None, help="also write the JSON to this file")
    args = parser.parse_args(argv)
    if args.batch is None:
        args.batch = 4 if args.quick else 16
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    if args.loop_classes is None:
        args.loop_classes = 10 if args.quick else 20
    args.round_budget_s = 20.0 if args.quick else 60.0
    args.setting_budget_s = 5.0 if args.quick else 15.0
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    model = build_model(args.seed, device)
    result: dict[str, Any] = {
        "benchmark": "contrast_cam",
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/contrast_cam.py", *sys.argv[1:]]),
        "quick": args.quick,
        "model": f"torchvision resnet18, weights=None, eval, seed {args.seed}",
        "env": environment(device),
    }
    log(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")

    share = CpuShare()
    single = bench_single(model, make_input(args.batch, args.size, args.seed, device), device, args)
    single["cpu_share"] = share.report()
    result["single"] = single
    t = single["median_ms"]
    log(
        f"[single] ContrastCAM {t['contrast_cam']:.1f} ms, LayerGradCam {t['layer_grad_cam']:.1f}"
        f" ms, pytorch-grad-cam {t['pytorch_grad_cam']:.1f} ms; ours/LayerGradCam "
        f"{single['ratio_ours_over_layergradcam']:.3f} (target <= {TARGET_SINGLE}), "
        f"ours/pytorch-grad-cam {single['ratio_ours_over_pytorch_grad_cam']:.3f}"
    )

    all_classes = {}
    x1 = make_input(1, args.size, args.seed + 1, device)
    share = CpuShare()
    all_classes["batch1"] = bench_all(
        model, x1, device, args, loop_classes=args.loop_classes, repeats=5
    )
    all_classes["batch1"]["cpu_share"] = share.report()
    if args.quick or args.skip_batch16:
        all_classes["batch16"] = {"skipped": "--quick" if args.quick else "--skip-batch16"}
    else:
        # Estimate from part 1 (batch 16): an all-class call costs a few single-map calls.
        single_s = t["contrast_cam"] / 1000.0 * 16 / args.batch
        estimate = single_s * (3 * 4 * len(SWEEP) + args.loop_classes_batch16 + 1)
        elapsed = time.perf_counter() - started
        if elapsed + estimate > args.budget_s:
            reason = (
                f"time budget: {elapsed:.0f} s spent, about {estimate:.0f} s more estimated, "
                f"budget {args.budget_s:.0f} s"
            )
            log(f"[all b16] skipped ({reason})")
            all_classes["batch16"] = {"skipped": reason}
        else:
            x16 = make_input(16, args.size, args.seed + 2, device)
            share = CpuShare()
            all_classes["batch16"] = bench_all(
                model, x16, device, args, loop_classes=args.loop_classes_batch16, repeats=3
            )
            all_classes["batch16"]["cpu_share"] = share.report()
    result["all_classes"] = all_classes
    if args.profile:
        result["profile_all_batch1"] = profile_all(model, x1, device)
    for name, part in [("single", single), *all_classes.items()]:
        cpu = part.get("cpu_share")
        if cpu:
            log(
                f"[cpu] {name}: {cpu['wall_s']} s wall, {cpu['own_cpu_s']} CPU-s ours, "
                f"{cpu['other_cpu_s']} CPU-s other processes, {cpu['steal_s']} s steal"
            )
    result["total_s"] = round(time.perf_counter() - started, 1)
    result["loadavg_1min_end"] = load_average()

    line = json.dumps(result, separators=(",", ":"))
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as handle:
            handle.write(line + "\n")
    print(line, flush=True)
    log(f"done in {result['total_s']} s")
    return result


if __name__ == "__main__":
    main()
