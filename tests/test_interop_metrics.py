"""captum.metrics on our methods: ``infidelity`` with :class:`ContrastiveForward` and
``sensitivity_max`` with per-example ``contrast``/``target``, against hand loops over the
recorded perturbations."""

from __future__ import annotations

import pytest
import torch
from _helpers import make_tiny_cnn
from _interop import (
    CAM_CLASSES,
    LAYER,
    PER_EXAMPLE,
    cross_entropy_rows,
    make_inputs,
    pooled_model,
)
from captum.metrics import infidelity, sensitivity_max

from captum_ext.attr import (
    ContrastCAM,
    ContrastiveForward,
)

# ------------------------------------------------------------------ metrics


class RecordingPerturbation:
    """A seeded perturbation that remembers every batch it produced (for the hand loop)."""

    def __init__(self, scale: float = 0.05, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.scale = scale
        self.batches: list[torch.Tensor] = []

    def noise(self, like: torch.Tensor) -> torch.Tensor:
        noise = self.scale * torch.randn(like.shape, generator=self.generator, dtype=like.dtype)
        self.batches.append(noise)
        return noise


@pytest.mark.parametrize("contrast_form", ["list", "tensor"])
def test_infidelity_of_contrast_cam_by_hand(contrast_form):
    """infidelity with the explained scalar CE(f(x), Q): forward = ContrastiveForward, target=Q.

    Infidelity expands ``target`` itself; the per-example Q must meet the noisy copies of its
    own example (checked by a loop over the recorded perturbations, example by example).
    """
    model = pooled_model()
    x = make_inputs(4, 12)
    contrast = PER_EXAMPLE if contrast_form == "list" else torch.tensor(PER_EXAMPLE)
    maps = ContrastCAM(model, "1.features.3").attribute(
        x, contrast=contrast, upsample_to_input=True, relu_attributions=False
    )
    attributions = maps.expand_as(x)  # infidelity wants the inputs' shape: one map per channel
    perturbation = RecordingPerturbation()

    def perturb(inputs):
        noise = perturbation.noise(inputs)
        return noise, inputs - noise

    got = infidelity(
        ContrastiveForward(model),
        perturb,
        x,
        attributions,
        target=contrast,
        n_perturb_samples=5,
        max_examples_per_batch=8,  # sub-batches of 2, 2 and 1 samples per example
    )
    assert [b.shape[0] for b in perturbation.batches] == [8, 8, 4]
    total = torch.zeros(4, dtype=torch.float64)
    with torch.no_grad():
        for noise in perturbation.batches:
            k = noise.shape[0] // 4
            for row in range(noise.shape[0]):
                i, q = row // k, PER_EXAMPLE[row // k]
                before = cross_entropy_rows(model, x[i : i + 1])[0, q]
                after = cross_entropy_rows(model, x[i : i + 1] - noise[row : row + 1])[0, q]
                explained = (attributions[i] * noise[row]).sum()
                total[i] += (explained - (before - after)) ** 2
    torch.testing.assert_close(got, total / 5, rtol=1e-9, atol=1e-14)


def _explain_as_tuple(cam):
    """What users hand to sensitivity_max for a layer method (CAPTUM_INTEROP point 5)."""

    def explain(inputs, **kwargs):
        return (cam.attribute(inputs, **kwargs),)

    return explain


@pytest.mark.parametrize("contrast_form", ["list", "tensor"])
def test_sensitivity_max_of_contrast_cam_by_hand(contrast_form):
    """sensitivity_max passes ``contrast`` unexpanded against N x k perturbed inputs."""
    model = make_tiny_cnn()
    x = make_inputs(4, 6)
    contrast = PER_EXAMPLE if contrast_form == "list" else torch.tensor(PER_EXAMPLE)
    cam = ContrastCAM(model, LAYER)
    perturbation = RecordingPerturbation(scale=0.1, seed=4)

    def perturb(inputs, radius):
        return inputs + perturbation.noise(inputs)

    got = sensitivity_max(
        _explain_as_tuple(cam),
        x,
        perturb_func=perturb,
        n_perturb_samples=5,
        max_examples_per_batch=8,
        contrast=contrast,
    )
    assert got.shape == (4,)
    assert [b.shape[0] for b in perturbation.batches] == [8, 8, 4]
    best = torch.zeros(4, dtype=torch.float64)
    for noise in perturbation.batches:
        k = noise.shape[0] // 4
        for row in range(noise.shape[0]):
            i, q = row // k, PER_EXAMPLE[row // k]
            plain = cam.attribute(x[i : i + 1], contrast=q)
            moved = cam.attribute(x[i : i + 1] + noise[row : row + 1], contrast=q)
            norm = plain.norm()
            value = (moved - plain).norm() / (norm if norm > 0 else 1.0)
            best[i] = torch.maximum(best[i], value)
    assert bool((best > 0).all())
    torch.testing.assert_close(got, best, rtol=1e-9, atol=1e-14)


def test_sensitivity_max_with_default_perturbation_equals_pre_expanded_contrast():
    """The per-example contrast equals handing each call a contrast pre-expanded the way
    sensitivity_max expands the inputs (repeat_interleave), under the same random state."""
    model = make_tiny_cnn()
    x = make_inputs(4, 6)
    cam = ContrastCAM(model, LAYER)
    contrast = torch.tensor(PER_EXAMPLE)

    def explain_pre_expanded(inputs):
        rows = inputs[0].shape[0] if isinstance(inputs, tuple) else inputs.shape[0]
        expanded = contrast.repeat_interleave(rows // 4)
        return (cam.attribute(inputs, contrast=expanded),)

    torch.manual_seed(0)
    got = sensitivity_max(
        _explain_as_tuple(cam),
        x,
        perturb_radius=0.2,
        n_perturb_samples=3,
        max_examples_per_batch=8,
        contrast=contrast,
    )
    torch.manual_seed(0)
    expected = sensitivity_max(
        explain_pre_expanded, x, perturb_radius=0.2, n_perturb_samples=3, max_examples_per_batch=8
    )
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert bool((got > 0).all())


@pytest.mark.parametrize("name", ["counterfactual", "gradcam++"])
def test_sensitivity_max_with_target_methods_runs(name, tiny_cnn, tiny_inputs):
    method = CAM_CLASSES[name](tiny_cnn, LAYER)
    torch.manual_seed(0)
    got = sensitivity_max(
        lambda inputs, **kw: (method.attribute(inputs, **kw),),
        tiny_inputs,
        n_perturb_samples=3,
        target=PER_EXAMPLE,
    )
    assert got.shape == (4,) and bool(torch.isfinite(got).all())
