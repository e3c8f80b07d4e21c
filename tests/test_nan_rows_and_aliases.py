"""Rows of NaN (a model whose activations overflowed on some inputs) and models that reach
a module by two names, through the methods, the metrics and the report's read-outs."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import torch
from torch import nn

from captum_ext._utils.maps import minmax_normalize
from captum_ext.attr import VOICE, GradCAM
from captum_ext.bundled import load_bundled_model
from captum_ext.data import BUNDLED_CAM_LAYER, load_sample_digits
from captum_ext.metrics import gradtrust, purview
from captum_ext.viz.uncertainty import ExplanationMetricsData


class _Aliased(nn.Module):
    """The bundled model with its head also registered as `self.head` (two names)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = load_bundled_model()
        self.head = self.net.classifier

    def forward(self, x):
        return self.net(x)


def test_per_example_gradients_leave_a_module_reached_by_two_names_as_it_was():
    """functional_call restored the aliased head from its second swap: torch.func wrapper
    tensors stayed in the model in place of its nn.Parameters, and a later deepcopy (the
    report's sanity checks) failed."""
    model = _Aliased().eval()
    x = load_sample_digits()[0][:4]
    before = {name: p for name, p in model.named_parameters()}
    scores = purview(model, x)
    plain = load_bundled_model().eval()
    torch.testing.assert_close(scores, purview(plain, x))
    torch.testing.assert_close(gradtrust(model, x, layer="all"), gradtrust(plain, x, layer="all"))
    after = dict(model.named_parameters())
    assert all(after[name] is p for name, p in before.items())
    assert all(isinstance(p, nn.Parameter) for p in after.values())
    copy.deepcopy(model)


def test_minmax_keeps_nan_maps_nan():
    """A map holding NaN became all zeros, an "empty" map read as certain and blank."""
    maps = torch.tensor([[[0.1, 0.5], [float("nan"), 0.9]], [[0.0, 1.0], [2.0, 4.0]]])[:, None]
    out = minmax_normalize(maps)
    assert bool(torch.isnan(out[0]).all())
    torch.testing.assert_close(out[1, 0], torch.tensor([[0.0, 0.25], [0.5, 1.0]]))


def test_voice_reads_nan_for_the_rows_that_overflowed_and_the_others_as_alone():
    """VOICE read NaN gradients as all-zero maps with IoU 1 and SNR 0 ("no uncertainty")."""
    model = load_bundled_model().eval()
    x = load_sample_digits()[0][:4].clone()
    x[1] = x[1] * 1e38  # finite, but the activations overflow: NaN logits for this row
    with torch.no_grad():
        assert bool(torch.isnan(model(x)[1]).all()) and bool(torch.isfinite(model(x)[0]).all())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result = VOICE(GradCAM(model, BUNDLED_CAM_LAYER)).attribute(x)
    assert bool(torch.isnan(result.iou[1])) and bool(torch.isnan(result.snr[1]))
    alone = VOICE(GradCAM(model, BUNDLED_CAM_LAYER)).attribute(x[[0, 2, 3]])
    torch.testing.assert_close(result.iou[[0, 2, 3]], alone.iou)
    torch.testing.assert_close(result.snr[[0, 2, 3]], alone.snr)


def test_best_counts_skip_nan_and_credit_every_method_on_a_tie():
    nan = float("nan")
    deletion = {
        "gradcam": np.array([0.158, nan, 0.30]),
        "contrast": np.array([0.387, nan, 0.30]),
        "counterfactual": np.array([nan, nan, 0.60]),
    }
    insertion = {
        "gradcam": np.array([nan, nan, 0.5]),
        "contrast": np.array([0.527, nan, 0.4]),
        "counterfactual": np.array([0.181, nan, 0.3]),
    }
    data = ExplanationMetricsData(
        predicted=torch.zeros(3, dtype=torch.long),
        runner_up=torch.ones(3, dtype=torch.long),
        fractions=np.linspace(0, 1, 3),
        auc={"deletion": deletion, "insertion": insertion},
        curves={},
        maps={},
        n_steps=2,
        baselines=0.0,
        class_names=["a", "b"],
        layer_name="",
        image_size=(2, 2),
    )
    assert data.best_counts == {
        "deletion": {"gradcam": 2, "contrast": 1, "counterfactual": 0},
        "insertion": {"gradcam": 1, "contrast": 1, "counterfactual": 0},
    }
