"""The runner-up class ("why P, rather than the second most likely class?") read from the
logits: never the prediction itself, ties to the lowest index, exact for confident and
float64 models.

``topk(2)[1]`` on a float32 softmax was used before: a confident model's other
probabilities round to exactly 0, so the report named any of them (the least likely class
on 0-255 digits); on an exact tie of the top two logits it returned the prediction itself
for some rows; and float64 logits cast to float32 tied where they differ in the 9th digit.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from captum_ext._utils.validation import runner_up_classes
from captum_ext.attr import ContrastCAM, GradCAM
from captum_ext.data import BUNDLED_CAM_LAYER
from captum_ext.metrics import class_sensitivity
from captum_ext.viz.report import compute_contrastive


def test_runner_up_is_the_best_other_class_with_ties_to_the_lowest_index():
    logits = torch.tensor(
        [
            [1.0, 3.0, 3.0, 0.0],  # P = 1 (first of the tie), Q = 2
            [5.0, 1.0, 2.0, 5.0],  # P = 0, Q = 3 (tied with P, not P itself)
            [-1e4, 0.0, -5e3, -2e3],  # softmax rounds every other class to 0
            [2.0, 2.0, 2.0, 2.0],  # all tied: P = 0, Q = 1
        ]
    )
    assert runner_up_classes(logits).tolist() == [2, 3, 3, 1]
    # against a given class (a label that is not the prediction)
    assert runner_up_classes(logits, torch.tensor([2, 3, 1, 3])).tolist() == [1, 0, 3, 0]
    # float64 logits keep their digits
    close = torch.zeros(1, 8, dtype=torch.float64)
    close[0, 0], close[0, 3], close[0, 7] = 5.0, 1.0, 1.0 + 1e-9
    assert runner_up_classes(close).tolist() == [7]


class _TiedCopy(nn.Module):
    """The bundled model with an extra output equal to the top logit (other gradient)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.m(x)
        top = z.gather(1, z.argmax(1, keepdim=True)).detach()
        tied = top + 0.5 * (z[:, 1:2] - z[:, 1:2].detach())
        return torch.cat([z, tied], 1)


def test_contrast_cam_default_is_never_the_prediction_on_a_tie(bundled_model, sample_digits):
    model = _TiedCopy(bundled_model).eval()
    x = sample_digits[0][:8]
    cam = ContrastCAM(model, "m." + BUNDLED_CAM_LAYER)
    default = cam.attribute(x)
    tied = cam.attribute(x, contrast=torch.full((8,), 10))
    torch.testing.assert_close(default, tied, rtol=0, atol=0)


def test_the_report_names_the_runner_up_of_a_confident_model(bundled_model, sample_digits):
    x = sample_digits[0][:4] * 255  # unnormalised pixels: logits of +-4,000
    with torch.no_grad():
        logits = bundled_model(x)
    expected = logits.topk(2, dim=1).indices[:, 1]  # no ties at this scale
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = compute_contrastive(bundled_model, BUNDLED_CAM_LAYER, x, batch_size=2)
    # Finer-CAM's maps vanish on such predictions; its own warning says why (and the report
    # captions them), the generic "zero gradients at the layer" one blamed the model
    assert not [w for w in caught if "exactly zero" in str(w.message)]
    assert data.predicted.tolist() == logits.argmax(1).tolist()
    assert data.runner_up.tolist() == expected.tolist()
    assert bool((data.probabilities.gather(1, expected[:, None]) == 0).all())  # why it failed


def test_class_sensitivity_ranks_float64_logits_in_float64():
    class Fixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3, padding=1, dtype=torch.float64)
            bias = torch.zeros(8, dtype=torch.float64)
            bias[0], bias[3], bias[7] = 5.0, 1.0, 1.0 + 1e-9
            self.register_buffer("bias", bias)

        def forward(self, x):
            return self.conv(x).mean(dim=(1, 2, 3))[:, None] * 1e-12 + self.bias

    model = Fixed().eval()
    x = torch.rand(2, 1, 6, 6, dtype=torch.float64)
    result = class_sensitivity(lambda m: GradCAM(m, m.conv), model, x)
    assert result.contrast.tolist() == [7, 7]


class _Confident(nn.Module):
    """Logits with class 0 first and class 3 second; every other probability rounds to 0
    in float32."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4, classes)
        with torch.no_grad():
            bias = torch.full((classes,), -400.0)
            bias[0], bias[3] = 0.0, -150.0
            self.fc.bias.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def test_every_report_section_names_the_same_runner_up():
    """The explanation-metrics and trust sections still took topk(2) of the float32
    softmax and named class 7 where the contrastive section names 3."""
    from captum_ext.viz.trust import compute_trust
    from captum_ext.viz.uncertainty import compute_explanation_metrics

    model = _Confident().eval()
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        contrastive = compute_contrastive(model, "conv", x)
        metrics = compute_explanation_metrics(model, "conv", x, n_steps=4)
        trust = compute_trust(
            model, "conv", x, labels=[0, 0, 3], least_trusted=3, scores=["softmax"]
        )
    assert contrastive.runner_up.tolist() == [3, 3, 3]
    assert metrics.runner_up.tolist() == [3, 3, 3]
    assert trust.runner_up.tolist() == [3, 3, 3]


def test_voice_names_the_lowest_index_of_tied_runner_ups():
    """VOICE sorted the classes with an unstable sort: on 99 tied classes its Q was 74 while
    ContrastCAM's default (and the report's other sections) say 1."""
    from captum_ext.attr import VOICE

    model = _Confident(classes=100).eval()
    with torch.no_grad():
        model.fc.weight[1:] = model.fc.weight[1]
        model.fc.bias[1:] = model.fc.bias[1]
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    result = VOICE(GradCAM(model, model.conv)).attribute(x, contrasts=3)
    with torch.no_grad():
        expected = runner_up_classes(model(x))
    assert expected.tolist() == [1, 1]
    assert result.contrast_class.tolist() == [1, 1]  # the runner-up Q
