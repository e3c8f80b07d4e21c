"""Every method beside its peers, in one process: the benchmark table of RESULTS.md.

Run from the repository root::

    python benchmarks/peers.py                      # about 10 minutes on 2 loaded CPU cores
    python benchmarks/peers.py --quick              # fewer rounds and loop classes
    python benchmarks/peers.py --write-results      # also replace the table in RESULTS.md
    python benchmarks/peers.py --device cuda [--autocast bf16]

Model: torchvision resnet18 with random weights (seeded, eval mode, no download), layer
``layer4``, 224 x 224 inputs from ``torch.randn``. Timings: ``_timing.time_interleaved``
(warm-up, then rounds in which every competitor of a row group runs once), minimum and
median per call. Rows:

1. One map per example, batch 1 and 16: our ContrastCAM (runner-up contrast), GradCAM and
   Grad-CAM++ against Captum's LayerGradCam, torch-cam's GradCAM / GradCAMpp and
   pytorch-grad-cam's GradCAM / GradCAMPlusPlus (each peer builds its hooks inside the call
   and removes them on exit, as ``with`` does), plus the plain forward.
2. All 1000 contrast classes, batch 1: ``ContrastCAM(contrast="all")`` (Grad-CAM and
   Grad-CAM++) against the published loop, one call per class (timed on ``--loop-classes``
   classes spread over 0..999 and extrapolated to 1000).
3. VOICE, batch 1: ``VOICE(GradCAM)`` / ``VOICE(Grad-CAM++)`` with all 999 contrasts (the
   low-resolution post-processing, and the materialising one it replaced) against the
   all-class ContrastCAM it is built on and the published loop (one upsampled map per class,
   1000 maps, extrapolated); Guided Backprop top-20 against 21 Captum calls. The maps, IoU
   and SNR are first checked against the loop on the loop's classes.
4. GradTrust, batch 64: the top-k (paper) and reference forms against plain inference.
5. Deletion on the bundled digit model against Quantus' PixelFlipping (the same curve: most
   relevant pixels to 0 in steps), when Quantus is installed; insertion has no Quantus peer.
6. Peak memory of the all-class ContrastCAM and VOICE calls, batch 1: growth of the resident
   set during the call (sampled every 0.5 ms in a fresh process, after a one-map warm-up call;
   memory the allocator kept from the warm-up is reused and not counted).

Prints one JSON line on stdout; progress on stderr; ``--write-results`` replaces the block
between ``<!-- peers:begin -->`` and ``<!-- peers:end -->`` in RESULTS.md with the Markdown.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from _timing import CpuShare, environment, load_average, time_each, time_interleaved
from captum.attr import GuidedBackprop, LayerGradCam

from captum_ext.attr import VOICE, ContrastCAM, Contrastive, GradCAM, LayerGradCamPlusPlus
from captum_ext.attr.voice import _variance
from captum_ext.metrics import deletion, gradtrust, voice_iou, voice_snr

HERE = Path(__file__).resolve().parent
LAYER = "layer4"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def optional(module: str):
    try:
        return __import__(module, fromlist=["_"])
    except Exception as error:  # noqa: BLE001 - any import failure means "not installable here"
        log(f"{module} not importable: {type(error).__name__}: {error}")
        return None


def summary(timing: dict[str, Any]) -> dict[str, float]:
    return {"min_s": timing["min_s"], "median_s": timing["median_s"], "rounds": timing["repeats"]}


def model_and_input(batch: int, device, seed: int = 1):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval().to(device)
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(seed))
    return model, x.to(device)


def minmax(maps: torch.Tensor) -> torch.Tensor:
    flat = maps.flatten(1)
    low, high = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    scaled = torch.where(high > low, (flat - low) / (high - low).clamp(min=1e-30), 0.0)
    return scaled.view_as(maps)


def interleave(fns, args, device) -> dict[str, dict[str, float]]:
    timings = time_interleaved(fns, warmup=1, repeats=args.rounds, min_repeats=2, device=device)
    return {name: summary(t) for name, t in timings.items()}


# 1. one map per example -------------------------------------------------------------------
def part_single(model, x, args, device, torchcam, pgc) -> dict[str, Any]:
    with torch.no_grad():
        pred = model(x).argmax(1)
    fns = {
        "contrast_cam": lambda: ContrastCAM(model, LAYER).attribute(x),
        "grad_cam": lambda: GradCAM(model, LAYER).attribute(x, target=pred),
        "grad_cam_pp": lambda: LayerGradCamPlusPlus(model, LAYER).attribute(x, target=pred),
        "captum_layer_grad_cam": lambda: LayerGradCam(model, model.layer4).attribute(
            x, target=pred
        ),
        "forward_no_grad": lambda: _no_grad(model, x),
    }
    if torchcam is not None:
        classes = pred.tolist()

        def torchcam_call(kind):
            def call():
                with kind(model, target_layer=LAYER) as extractor:
                    scores = model(x)
                    return extractor(class_idx=classes, scores=scores)

            return call

        fns["torchcam_grad_cam"] = torchcam_call(torchcam.GradCAM)
        fns["torchcam_grad_cam_pp"] = torchcam_call(torchcam.GradCAMpp)
    if pgc is not None:
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        targets = [ClassifierOutputTarget(int(c)) for c in pred]

        def pgc_call(kind):
            def call():
                with kind(model=model, target_layers=[model.layer4]) as cam:
                    return cam(input_tensor=x, targets=targets)

            return call

        fns["pytorch_grad_cam_grad_cam"] = pgc_call(pgc.GradCAM)
        fns["pytorch_grad_cam_grad_cam_pp"] = pgc_call(pgc.GradCAMPlusPlus)
    log(f"[single] batch {x.shape[0]}: {', '.join(fns)}")
    result = interleave(fns, args, device)
    model.zero_grad(set_to_none=True)  # the peers' backward fills the parameters' .grad
    return result


def _no_grad(model, x):
    with torch.no_grad():
        return model(x)


# 2. all classes vs the loop ---------------------------------------------------------------
def loop_classes(count: int, skip: int) -> list[int]:
    return [q for q in range(0, 1000, 1000 // count) if q != skip][:count]


def part_all(model, x, args, device) -> dict[str, Any]:
    prediction = int(model(x).argmax())
    classes = loop_classes(args.loop_classes, prediction)
    out: dict[str, Any] = {}
    for weighting in ("gradcam", "gradcam++"):
        cam = ContrastCAM(model, LAYER, weighting=weighting)
        every = cam.attribute(x, contrast="all")
        looped = torch.cat([cam.attribute(x, contrast=q) for q in classes], 1)
        diff = float((every[:, classes] - looped).abs().max())
        fast = interleave({"all": lambda cam=cam: cam.attribute(x, contrast="all")}, args, device)
        loop = time_each([lambda q=q, cam=cam: cam.attribute(x, contrast=q) for q in classes])
        per_class = min(loop["times_s"])  # identical calls: the least disturbed one
        out[weighting] = {
            "all_classes": fast["all"],
            "loop_per_class_s": per_class,
            "loop_1000_s": 1000 * per_class,
            "loop_extrapolated_from": len(classes),
            "speedup_min": 1000 * per_class / fast["all"]["min_s"],
            "max_abs_diff_vs_loop": diff,
        }
        log(f"[all] {weighting}: {fast['all']['min_s']:.3f} s vs {1000 * per_class:.1f} s loop")
    return out


# 3. VOICE ---------------------------------------------------------------------------------
def loop_uncertainty(one_map, classes):
    maps = torch.stack([minmax(torch.relu(one_map(q))) for q in classes])
    count = torch.tensor([float(len(classes))], device=maps.device)
    return minmax(_variance(maps.sum(0), maps.square().sum(0), count))


def part_voice(model, x, args, device) -> dict[str, Any]:
    prediction = int(model(x).argmax())
    classes = loop_classes(args.loop_classes, prediction)
    out: dict[str, Any] = {}
    for weighting, method in (
        ("gradcam", lambda: GradCAM(model, LAYER)),
        ("gradcam++", lambda: LayerGradCamPlusPlus(model, LAYER)),
    ):
        cam = ContrastCAM(model, LAYER, weighting=weighting)

        def one_map(q, cam=cam):
            return cam.attribute(x, contrast=q, upsample_to_input=True)[:, 0]

        fast_voice, slow_voice = VOICE(method()), VOICE(method())
        slow_voice._fast_postprocess = False
        # agreement with the published loop on the loop's classes (float32, as published)
        subset = fast_voice.attribute(x, contrasts=classes)
        reference = loop_uncertainty(one_map, classes)
        # and with the loop in float64 (both float32 routes against the exact numbers)
        model64 = copy.deepcopy(model).double()
        cam64 = ContrastCAM(model64, LAYER, weighting=weighting)
        exact = loop_uncertainty(
            lambda q, cam64=cam64: cam64.attribute(x.double(), contrast=q, upsample_to_input=True)[
                :, 0
            ],
            classes,
        )
        materialised = slow_voice.attribute(x, contrasts=classes)
        explanation = minmax(
            torch.relu(method().attribute(x, target=prediction, upsample_to_input=True)[:, 0])
        )
        check = {
            "max_abs_diff_uncertainty": float((subset.uncertainty[:, 0] - reference).abs().max()),
            "iou_diff": float(
                (subset.iou - voice_iou(subset.explanation[:, 0], reference)).abs().max()
            ),
            "snr_diff": float((subset.snr - voice_snr(reference)).abs().max()),
            "explanation_diff": float((subset.explanation[:, 0] - explanation).abs().max()),
            "float64_loop_diff": float((subset.uncertainty[:, 0].double() - exact).abs().max()),
            "float64_loop_diff_materialising": float(
                (materialised.uncertainty[:, 0].double() - exact).abs().max()
            ),
            "float32_loop_vs_float64_loop": float((reference.double() - exact).abs().max()),
        }
        full_fast, full_slow = fast_voice.attribute(x), slow_voice.attribute(x)
        check["fast_vs_materialising_uncertainty"] = float(
            (full_fast.uncertainty - full_slow.uncertainty).abs().max()
        )
        check["fast_vs_materialising_iou"] = float((full_fast.iou - full_slow.iou).abs().max())
        check["fast_vs_materialising_snr"] = float((full_fast.snr - full_slow.snr).abs().max())
        timings = interleave(
            {
                "voice": lambda v=fast_voice: v.attribute(x),
                "voice_materialising": lambda v=slow_voice: v.attribute(x),
                "contrast_cam_all": lambda cam=cam: cam.attribute(x, contrast="all"),
            },
            args,
            device,
        )
        loop = time_each([lambda q=q: one_map(q) for q in classes])
        loop_total = 1000 * min(loop["times_s"])  # 999 contrasts + the explanation of P
        out[weighting] = {
            **timings,
            "loop_per_map_s": min(loop["times_s"]),
            "loop_1000_s": loop_total,
            "loop_extrapolated_from": len(classes),
            "voice_over_contrast_cam_all_min": timings["voice"]["min_s"]
            / timings["contrast_cam_all"]["min_s"],
            "speedup_vs_loop_min": loop_total / timings["voice"]["min_s"],
            "materialising_speedup_vs_loop_min": loop_total
            / timings["voice_materialising"]["min_s"],
            "checks": check,
        }
        log(f"[voice] {weighting}: {json.dumps(out[weighting])}")
    out["guided_backprop_top20"] = part_guided(model, x, args, device)
    return out


def part_guided(model, x, args, device) -> dict[str, Any]:
    k = 20
    order = model(x).argsort(1, descending=True)[0].tolist()
    guided = Contrastive(GuidedBackprop, model)
    explain = GuidedBackprop(model)
    voice = VOICE(GuidedBackprop(model))
    contrasts = order[1 : k + 1]

    def published():
        explain.attribute(x, target=order[0])
        return loop_uncertainty(lambda q: guided.attribute(x, contrast=q), contrasts)

    diff = float((voice.attribute(x, contrasts=k).uncertainty - published()).abs().max())
    timings = interleave(
        {
            "voice": lambda: voice.attribute(x, contrasts=k),
            "voice_max_batch_8": lambda: voice.attribute(x, contrasts=k, max_batch=8),
            "loop": published,
        },
        args,
        device,
    )
    return {
        **timings,
        "k": k,
        "speedup_min": timings["loop"]["min_s"] / timings["voice"]["min_s"],
        "max_abs_diff_vs_loop": diff,
    }


# 4. GradTrust -----------------------------------------------------------------------------
def part_gradtrust(args, device) -> dict[str, Any]:
    model, x = model_and_input(args.gradtrust_batch, device, seed=3)
    timings = interleave(
        {
            "inference": lambda: _no_grad(model, x),
            "gradtrust_topk": lambda: gradtrust(model, x),
            "gradtrust_reference": lambda: gradtrust(model, x, form="reference"),
        },
        args,
        device,
    )
    base = timings["inference"]["min_s"]
    return {
        **timings,
        "batch": args.gradtrust_batch,
        "topk_over_inference_min": timings["gradtrust_topk"]["min_s"] / base,
        "reference_over_inference_min": timings["gradtrust_reference"]["min_s"] / base,
    }


# 5. deletion vs Quantus -------------------------------------------------------------------
def part_deletion(args, quantus) -> dict[str, Any]:
    from captum_ext.bundled import load_bundled_model
    from captum_ext.data import BUNDLED_CAM_LAYER, load_sample_digits

    model = load_bundled_model().eval()
    images, labels = load_sample_digits()
    x, y = images[: args.deletion_images], labels[: args.deletion_images]
    maps = F.interpolate(
        LayerGradCam(model, model.get_submodule(BUNDLED_CAM_LAYER)).attribute(x, target=y),
        size=x.shape[2:],
        mode="bilinear",
    )
    steps = 28  # 784 pixels, 28 per step
    fns = {
        "deletion": lambda: deletion(model, x, maps, target=y, baselines=0.0, n_steps=steps),
    }
    out: dict[str, Any] = {"images": len(x), "n_steps": steps}
    if quantus is not None:
        metric = quantus.PixelFlipping(
            features_in_step=784 // steps,
            perturb_baseline="black",
            normalise=False,
            abs=False,
            return_auc_per_sample=False,  # its AUC calls np.trapz, gone in NumPy 2.4
            disable_warnings=True,
        )
        x_np, y_np, a_np = x.numpy(), y.numpy(), maps.detach().numpy()

        def quantus_call():
            return metric(
                model=model,
                x_batch=x_np,
                y_batch=y_np,
                a_batch=a_np,
                device="cpu",
                channel_first=True,
            )

        def quantus_auc():
            curves = np.asarray(quantus_call(), dtype=np.float64)
            return np.trapezoid(curves, dx=1.0 / (curves.shape[1] - 1), axis=1)

        fns["quantus_pixel_flipping"] = quantus_auc
        ours = deletion(model, x, maps, target=y, baselines=0.0, n_steps=steps)
        theirs = torch.as_tensor(quantus_auc(), dtype=ours.dtype)
        # Quantus' curve starts after the first step (no unperturbed point): close, not equal
        out["pearson_ours_vs_quantus"] = float(torch.corrcoef(torch.stack([ours, theirs]))[0, 1])
        out["max_abs_auc_diff"] = float((ours - theirs).abs().max())
    out.update(interleave(fns, args, "cpu"))
    if quantus is not None:
        out["quantus_over_ours_min"] = (
            out["quantus_pixel_flipping"]["min_s"] / out["deletion"]["min_s"]
        )
    return out


# 6. peak memory ---------------------------------------------------------------------------
MEMORY_CHILD = r"""
import os, sys, threading, time, torch, torchvision
from captum_ext.attr import VOICE, ContrastCAM, GradCAM
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * page
torch.manual_seed(0)
model = torchvision.models.resnet18(weights=None).eval()
x = torch.randn(1, 3, 224, 224)
cam = ContrastCAM(model, "layer4")
cam.attribute(x)  # one-map call: warms oneDNN and the allocator
kind = sys.argv[1]
if kind == "contrast_cam_all":
    call = lambda: cam.attribute(x, contrast="all")
else:
    voice = VOICE(GradCAM(model, "layer4"))
    voice._fast_postprocess = kind == "voice"
    call = lambda: voice.attribute(x)
peak, running = [0], [True]
def sample():
    while running[0]:
        peak[0] = max(peak[0], rss())
        time.sleep(0.0005)
base = rss()
thread = threading.Thread(target=sample)
thread.start()
call()
running[0] = False
thread.join()
print((max(peak[0], rss()) - base) / 2**20)
"""


def part_memory() -> dict[str, float]:
    out = {}
    for kind in ("contrast_cam_all", "voice", "voice_materialising"):
        done = subprocess.run(
            [sys.executable, "-c", MEMORY_CHILD, kind], capture_output=True, text=True, check=True
        )
        out[f"{kind}_peak_mib"] = round(float(done.stdout.strip().splitlines()[-1]), 1)
    return out


# the table --------------------------------------------------------------------------------
def ms(value: float) -> str:
    return f"{value * 1e3:,.0f}".replace(",", " ")


def cell(timing: dict[str, float]) -> str:
    return f"{ms(timing['min_s'])} ({ms(timing['median_s'])})"


def markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = [
        f"Run: {result['date']}, `python benchmarks/peers.py{result['arguments']}`, "
        f"device `{env['device']}` ({env['device_name']}), {env['cpus_usable']} usable CPUs, "
        f"torch threads {env['torch_num_threads']}, torch {env['torch']}, captum "
        f"{env['captum']}, grad-cam {env['grad_cam']}, torchcam {result['versions']['torchcam']}, "
        f"quantus {result['versions']['quantus']}; load average (1 min) "
        f"{result['load_before']} before, {result['load_after']} after; CPU taken by other "
        f"processes during the run: {result['cpu_share']}.",
        "",
        "Milliseconds per call, **minimum** (median) over interleaved rounds; ratios from the "
        "minima. resnet18 (random weights), 224 x 224, layer4.",
        "",
        "| row | ours | peers |",
        "|---|---|---|",
    ]
    for batch, single in result["single"].items():
        peers = ", ".join(
            f"{name} {cell(single[name])}"
            for name in single
            if name not in ("contrast_cam", "grad_cam", "grad_cam_pp")
        )
        ours = ", ".join(
            f"{name} {cell(single[name])}" for name in ("contrast_cam", "grad_cam", "grad_cam_pp")
        )
        lgc = single["captum_layer_grad_cam"]["min_s"]
        ratios = [f"ContrastCAM / LayerGradCam **{single['contrast_cam']['min_s'] / lgc:.2f}x**"]
        if "torchcam_grad_cam" in single:
            ratios.append(
                f"torch-cam / LayerGradCam {single['torchcam_grad_cam']['min_s'] / lgc:.2f}x"
            )
        if "pytorch_grad_cam_grad_cam" in single:
            ratios.append(
                "pytorch-grad-cam / LayerGradCam "
                f"{single['pytorch_grad_cam_grad_cam']['min_s'] / lgc:.2f}x"
            )
        lines.append(f"| one map, {batch} | {ours} | {peers}; {'; '.join(ratios)} |")
    for weighting, row in result["all_classes"].items():
        lines.append(
            f"| all 1000 contrasts, {weighting}, batch 1 | {cell(row['all_classes'])} | "
            f"loop {ms(row['loop_1000_s'])} (1000 x {ms(row['loop_per_class_s'])}, from "
            f"{row['loop_extrapolated_from']} classes); **{row['speedup_min']:.0f}x** |"
        )
    for weighting in ("gradcam", "gradcam++"):
        row = result["voice"][weighting]
        checks = row["checks"]
        lines.append(
            f"| VOICE({weighting}), 999 contrasts, batch 1 | {cell(row['voice'])}; "
            f"materialising post-processing {cell(row['voice_materialising'])} | ContrastCAM all "
            f"{cell(row['contrast_cam_all'])}: VOICE / ContrastCAM all "
            f"**{row['voice_over_contrast_cam_all_min']:.2f}x**; loop "
            f"{ms(row['loop_1000_s'])} (1000 maps, from {row['loop_extrapolated_from']}): "
            f"**{row['speedup_vs_loop_min']:.0f}x** (materialising: "
            f"{row['materialising_speedup_vs_loop_min']:.0f}x); vs loop: map "
            f"{checks['max_abs_diff_uncertainty']:.1e}, IoU {checks['iou_diff']:.1e}, SNR "
            f"{checks['snr_diff']:.1e}; vs a float64 loop: map {checks['float64_loop_diff']:.1e} "
            f"(materialising {checks['float64_loop_diff_materialising']:.1e}; the float32 loop "
            f"itself {checks['float32_loop_vs_float64_loop']:.1e}) |"
        )
    guided = result["voice"]["guided_backprop_top20"]
    lines.append(
        f"| VOICE(GuidedBackprop), top-20, batch 1 | {cell(guided['voice'])}; max_batch 8 "
        f"{cell(guided['voice_max_batch_8'])} | 21 Captum calls {cell(guided['loop'])}; "
        f"**{guided['speedup_min']:.1f}x**; map diff {guided['max_abs_diff_vs_loop']:.1e} |"
    )
    trust = result["gradtrust"]
    lines.append(
        f"| GradTrust, batch {trust['batch']} | top-k {cell(trust['gradtrust_topk'])}, "
        f"reference {cell(trust['gradtrust_reference'])} | inference "
        f"{cell(trust['inference'])}; **{trust['topk_over_inference_min']:.2f}x** / "
        f"**{trust['reference_over_inference_min']:.2f}x** of inference |"
    )
    dele = result["deletion"]
    if "quantus_pixel_flipping" in dele:
        peer = (
            f"Quantus PixelFlipping {cell(dele['quantus_pixel_flipping'])}: "
            f"**{dele['quantus_over_ours_min']:.1f}x** slower; per-image AUC Pearson r "
            f"{dele['pearson_ours_vs_quantus']:.3f}, max diff {dele['max_abs_auc_diff']:.3f}; "
            "insertion: no Quantus peer"
        )
    else:
        peer = "Quantus not installable here"
    lines.append(
        f"| deletion, bundled digit model, {dele['images']} images, {dele['n_steps']} steps "
        f"| {cell(dele['deletion'])} | {peer} |"
    )
    memory = result["memory"]
    if not memory:
        return "\n".join(lines)
    lines.append(
        f"| peak memory (resident set growth during the call, sampled every 0.5 ms, after a "
        f"one-map warm-up call), batch 1 | ContrastCAM all "
        f"{memory['contrast_cam_all_peak_mib']} MiB; VOICE {memory['voice_peak_mib']} MiB | "
        f"VOICE materialising post-processing {memory['voice_materialising_peak_mib']} MiB |"
    )
    return "\n".join(lines)


def write_results(table: str) -> None:
    path = HERE / "RESULTS.md"
    text = path.read_text()
    begin, end = "<!-- peers:begin -->", "<!-- peers:end -->"
    if begin not in text or end not in text:
        raise SystemExit(f"{path} has no {begin} ... {end} block")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{table}\n{end}{tail}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--autocast", choices=("fp16", "bf16"), default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--loop-classes", type=int, default=20)
    parser.add_argument("--gradtrust-batch", type=int, default=64)
    parser.add_argument("--deletion-images", type=int, default=16)
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.loop_classes, args.gradtrust_batch = 3, 8, 16
    device = torch.device(args.device)
    torchcam = optional("torchcam.methods")
    pgc = optional("pytorch_grad_cam")
    quantus = optional("quantus")
    share = CpuShare()
    result: dict[str, Any] = {
        "benchmark": "peers",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "arguments": "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:])),
        "load_before": load_average(),
        "versions": {
            "torchcam": getattr(sys.modules.get("torchcam"), "__version__", None),
            "quantus": getattr(quantus, "__version__", None),
        },
    }
    half = torch.float16 if args.autocast == "fp16" else torch.bfloat16
    autocast = (
        torch.autocast(device.type, dtype=half) if args.autocast else contextlib.nullcontext()
    )
    with autocast:
        result["single"] = {}
        for batch in (1, 16):
            model, x = model_and_input(batch, device)
            result["single"][f"batch {batch}"] = part_single(model, x, args, device, torchcam, pgc)
        model, x = model_and_input(1, device)
        result["all_classes"] = part_all(model, x, args, device)
        result["voice"] = part_voice(model, x, args, device)
        result["gradtrust"] = part_gradtrust(args, device)
    result["deletion"] = part_deletion(args, quantus)
    result["memory"] = part_memory() if device.type == "cpu" else {}
    result["load_after"] = load_average()
    result["cpu_share"] = share.report()
    result["environment"] = environment(device)
    table = markdown(result)
    log(table)
    if args.write_results:
        write_results(table)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
