"""Every attribution method against the designed oracles of ``captum_ext.testing``.

Not a timing benchmark: a correctness table. For each oracle the methods explain the target
logit and their maps are scored against the exact ground truth:

- dominant colour: top-k F1 of the positive evidence (pixels of the target's colour) and of the
  negative evidence (pixels of competing colours);
- null region: the share of |attribution| that falls on the null half (exactly 0 is right);
- interaction (AND / XOR of two patches): top-k F1 of |attribution| against the Shapley values.

A method "passes" an oracle when its F1 is >= 0.99 (null region: share <= 1e-6). Prints a
markdown table and one JSON line. Run: ``python benchmarks/oracles.py``.
"""

from __future__ import annotations

import json
import sys
import warnings

import torch
import torch.nn.functional as F
from captum.attr import (
    DeepLift,
    GuidedBackprop,
    InputXGradient,
    IntegratedGradients,
    LayerGradCam,
    Occlusion,
    Saliency,
)

from captum_ext.attr import (
    ContrastCAM,
    FinerCAM,
    GradCAM,
    LayerGradCamPlusPlus,
    LayerIBA,
    PathwayGradient,
)
from captum_ext.metrics.ground_truth import attribution_f1
from captum_ext.testing import dominant_colour_oracle, interaction_oracle, null_region_oracle

N = 16


def _upsampled(maps, inputs):
    return F.interpolate(maps, size=inputs.shape[-2:], mode="bilinear", align_corners=False)


def _layer_iba(model, layer, x, t):
    """LayerIBA with the paper's settings, statistics estimated on the oracle's inputs, bits
    upsampled with their total kept."""
    iba = LayerIBA(model, layer)
    iba.estimate(x)
    return iba.attribute(x, target=t, generator=0, upsample_to_input=True)


def _methods(oracle, layer):
    """name -> callable returning (N, C or 1, H, W) maps for the oracle's target."""
    model, x, t, base = oracle.model, oracle.inputs, oracle.target, oracle.baselines
    methods = {
        "Saliency": lambda: Saliency(model).attribute(x.clone(), target=t, abs=False),
        "InputXGradient": lambda: InputXGradient(model).attribute(x.clone(), target=t),
        "IntegratedGradients": lambda: IntegratedGradients(model).attribute(
            x, baselines=base, target=t, n_steps=64
        ),
        "DeepLift": lambda: DeepLift(model).attribute(x.clone(), baselines=base, target=t),
        "GuidedBackprop": lambda: GuidedBackprop(model).attribute(x.clone(), target=t),
        "Occlusion (1 px)": lambda: Occlusion(model).attribute(
            x, sliding_window_shapes=(x.shape[1], 1, 1), baselines=base, target=t
        ),
        "PathwayGradient (sparsity 0.7)": lambda: PathwayGradient(model).attribute(
            x, target=t, sparsity=0.7
        ),
    }
    if layer is not None:
        methods.update(
            {
                "LayerGradCam (Captum)": lambda: _upsampled(
                    LayerGradCam(model, layer).attribute(x, target=t), x
                ),
                "GradCAM": lambda: GradCAM(model, layer).attribute(x, target=t),
                "GradCAM++": lambda: LayerGradCamPlusPlus(model, layer).attribute(x, target=t),
                "FinerCAM": lambda: FinerCAM(model, layer).attribute(x, target=t),
                # the oracles' targets are the predictions, which ContrastCAM explains
                "ContrastCAM (vs. runner-up)": lambda: ContrastCAM(model, layer).attribute(
                    x, contrast=model(x).topk(2, dim=1).indices[:, 1]
                ),
                "LayerIBA": lambda: _layer_iba(model, layer, x, t),
            }
        )
    return methods


def _run(oracle, layer, score):
    row = {}
    for name, method in _methods(oracle, layer).items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                maps = method().detach()
            if maps.shape[-2:] != oracle.inputs.shape[-2:]:
                maps = _upsampled(maps, oracle.inputs)
            row[name] = score(maps)
        except Exception as error:  # a method that cannot run on this network is a finding
            row[name] = f"n/a ({type(error).__name__})"
    return row


def main() -> dict:
    colour = dominant_colour_oracle(N, colours=4, seed=0)
    null = null_region_oracle(N, seed=0)
    interaction = interaction_oracle(N, seed=0)

    def colour_score(maps):
        positive = attribution_f1(maps, colour.ground_truth).mean().item()
        negative = attribution_f1(maps, colour.ground_truth, sign="negative").mean().item()
        return round(positive, 3), round(negative, 3)

    def null_share(maps):
        magnitude = maps.sum(1, keepdim=True).abs()
        share = magnitude[null.ground_truth == 0].sum() / magnitude.sum().clamp_min(1e-30)
        return float(f"{share.item():.3g}")

    def interaction_score(maps):
        return round(
            attribution_f1(maps, interaction.ground_truth, sign="absolute").mean().item(), 3
        )

    tables = {
        "dominant colour (F1 +, F1 -)": _run(colour, colour.model.relu2, colour_score),
        "null region (share on null half)": _run(null, null.model.features[3], null_share),
        "interaction AND/XOR (F1 |.|)": _run(interaction, None, interaction_score),
    }
    methods = list(tables["dominant colour (F1 +, F1 -)"])
    print("| method | " + " | ".join(tables) + " |")
    print("|---" * (len(tables) + 1) + "|")
    for method in methods:
        cells = [str(tables[name].get(method, "n/a (no conv layer)")) for name in tables]
        print(f"| {method} | " + " | ".join(cells) + " |")
    result = {"benchmark": "oracles", "n": N, "torch": torch.__version__, "tables": tables}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
