"""One model explained from several threads at once (a web service's thread pool).

The methods register hooks on the user's modules and swap parameters for per-example
gradients; another thread's forward pass saw them. Before the per-model lock, 4 threads
running GradCAM on one model failed in 26 of 30 calls ("`layer` (ReLU) ran 3 times in one
forward pass") and GradTrust at a layer returned wrong scores in 22 of 30 without a word.
Every threaded result must equal the one computed alone, and the model must come back as it
was.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from _helpers import assert_model_unchanged, model_snapshot

from captum_ext.attr import VOICE, ContrastCAM, GradCAM, LayerIBA, PathwayGradient
from captum_ext.metrics import gradtrust

LAYER = "features.7"


def _iba(model, x, y):
    iba = LayerIBA(model, LAYER, mean=torch.zeros(64, 1, 1), std=torch.ones(64, 1, 1))
    return iba.attribute(x, target=y, generator=torch.Generator().manual_seed(0))


CALLS = {
    "GradCAM": lambda model, x, y: GradCAM(model, LAYER).attribute(x, target=y),
    "ContrastCAM": lambda model, x, y: ContrastCAM(model, LAYER).attribute(
        x, contrast=(y + 1) % 10
    ),
    "VOICE": lambda model, x, y: VOICE(GradCAM(model, LAYER)).attribute(x, target=y).uncertainty,
    "PathwayGradient": lambda model, x, y: PathwayGradient(model).attribute(x, target=y),
    "gradtrust at a layer": lambda model, x, y: gradtrust(model, x, layer="features.6"),
    "LayerIBA": _iba,
}


@pytest.mark.parametrize("name", list(CALLS))
def test_threads_sharing_one_model_get_their_own_results(name, bundled_model, sample_digits):
    call = CALLS[name]
    x, y = sample_digits
    jobs = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 40, 4)]
    alone = [call(bundled_model, a, b) for a, b in jobs]
    before = model_snapshot(bundled_model)
    for _ in range(2):
        with ThreadPoolExecutor(max_workers=4) as pool:
            futures = [pool.submit(call, bundled_model, a, b) for a, b in jobs]
            together = [future.result() for future in futures]
        for got, expected in zip(together, alone, strict=True):
            torch.testing.assert_close(got, expected)
    assert_model_unchanged(bundled_model, before)


def test_a_layer_seen_twice_names_the_other_threads_remedy(bundled_model, sample_digits):
    """A plain forward pass of the same model in another thread (or a nested explanation)
    runs through the method's hooks and makes the layer look as if it ran twice; the error
    says so and gives the remedy, a copy of the model, instead of only "pick another
    layer" (the lock orders the methods' calls, not the user's own forward passes)."""
    x, y = sample_digits
    layer = bundled_model.features[7]

    def predicts_inside(module, args, output):  # what another thread's forward would do
        if not getattr(predicts_inside, "busy", False):
            predicts_inside.busy = True
            bundled_model(x[:2])
            predicts_inside.busy = False

    handle = bundled_model.classifier.register_forward_hook(predicts_inside)
    try:
        with pytest.raises(ValueError, match=r"ran 2 times.*another thread.*copy\.deepcopy"):
            GradCAM(bundled_model, layer).attribute(x[:2], target=y[:2])
    finally:
        handle.remove()
