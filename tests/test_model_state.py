"""Every method leaves a model exactly as it found it: here, a model in TRAIN mode.

In train mode a forward pass updates BatchNorm's running statistics in place; a method that
runs the model must put them back. And when the model itself raises, its own exception type
reaches the user (with a note), not a ValueError of ours.
"""

from __future__ import annotations

import pytest
import torch
from _helpers import assert_model_unchanged, make_tiny_cnn, model_snapshot
from captum.attr import Saliency
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from captum_ext.attr import (
    VOICE,
    ActivationMatchingMask,
    ContrastCAM,
    Contrastive,
    CounterfactualCAM,
    GradCAM,
    LayerIBA,
)
from captum_ext.circuits import CircuitReadout
from captum_ext.inversion import weight_gradient_norm
from captum_ext.metrics import (
    class_sensitivity,
    gradtrust,
    model_randomisation,
    score_dataset,
    softmax_confidence,
)


def _train_mode_model() -> nn.Module:
    model = make_tiny_cnn()
    model.train()
    # dropout off, so that the test is about the BatchNorm buffers alone
    for module in model.modules():
        if isinstance(module, (nn.Dropout, nn.Dropout2d)):
            module.p = 0.0
    return model


def _layer_iba(model, x):
    iba = LayerIBA(model, model.features[3])
    iba.estimate(x)
    return iba.attribute(x, target=0, steps=2, n_noise=2, generator=0)


CALLS = {
    "ContrastCAM": lambda m, x: ContrastCAM(m, m.features[3]).attribute(x, contrast=1),
    "ContrastCAM-all": lambda m, x: ContrastCAM(m, m.features[3]).attribute(x, contrast="all"),
    "CounterfactualCAM": lambda m, x: CounterfactualCAM(m, m.features[3]).attribute(x),
    "GradCAM": lambda m, x: GradCAM(m, m.features[3]).attribute(x, target=0),
    "Contrastive": lambda m, x: Contrastive(Saliency, m).attribute(x, contrast=1),
    "VOICE": lambda m, x: VOICE(ContrastCAM(m, m.features[3])).attribute(x),
    "gradtrust": lambda m, x: gradtrust(m, x),
    "softmax_confidence": lambda m, x: softmax_confidence(m, x),
    "ActivationMatchingMask": lambda m, x: ActivationMatchingMask(
        m, ["features.3"], weights="mnist"
    ).attribute(x, mode="per_image", steps=2, progress=False),
    "CircuitReadout": lambda m, x: CircuitReadout(m).readout(x, target=0),
    "LayerIBA": _layer_iba,
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_train_mode_model_comes_back_with_its_batchnorm_statistics(name, tiny_inputs):
    model = _train_mode_model()
    before = model_snapshot(model)
    CALLS[name](model, tiny_inputs)
    assert_model_unchanged(model, before)
    # the statistics really are what a forward pass in train mode changes
    model(tiny_inputs)
    changed = model_snapshot(model)["buffers"]
    assert any(not torch.equal(changed[k], before["buffers"][k]) for k in changed)


class _Raising(nn.Module):
    """TinyCNN whose head raises the model's own error type after the explained layer."""

    class ShapeError(RuntimeError):
        pass

    def __init__(self) -> None:
        super().__init__()
        self.inner = make_tiny_cnn()
        self.features = self.inner.features

    def forward(self, x):
        self.features(x)
        raise self.ShapeError("mat1 and mat2 shapes cannot be multiplied (from the model)")


@pytest.mark.parametrize(
    "name", ["ContrastCAM", "CounterfactualCAM", "GradCAM", "VOICE", "gradtrust", "LayerIBA"]
)
def test_the_models_own_exception_reaches_the_user(name, tiny_inputs):
    model = _Raising().eval()
    before = model_snapshot(model)
    with pytest.raises(_Raising.ShapeError, match="from the model") as info:
        CALLS[name](model, tiny_inputs)
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "(4, 3, 6, 6)" in notes or "(4, 3, 6, 6)" in str(info.value)
    assert_model_unchanged(model, before)


@pytest.mark.parametrize(
    "convert, hint",
    [
        (lambda x: x.float(), "`inputs` is torch.float32 but the model's parameters are"),
        (lambda x: (x * 50).to(torch.uint8), "holds integers (torch.uint8); if they are image"),
    ],
)
@pytest.mark.parametrize(
    "name", ["GradCAM", "VOICE", "gradtrust", "Contrastive", "LayerIBA", "CircuitReadout"]
)
def test_a_dtype_mismatch_is_named_beside_torchs_error(name, convert, hint, tiny_inputs):
    """torch says "Input type (double) and bias type (float) should be the same" from inside
    the first convolution; the note names the argument and the conversion (uint8 pixels from
    ``torchvision.io.read_image`` or ``pil_to_tensor`` are the usual case)."""
    model = make_tiny_cnn().eval()  # float64
    with pytest.raises(RuntimeError, match="should be the same") as info:
        CALLS[name](model, convert(tiny_inputs))
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert hint in notes


def test_a_dtype_mismatch_is_named_by_the_mask_fits(tiny_inputs):
    """ActivationMatchingMask called the model itself and gave torch's bare error."""
    model = make_tiny_cnn().eval()  # float64
    with pytest.raises(RuntimeError, match="should be the same") as info:
        CALLS["ActivationMatchingMask"](model, tiny_inputs.float())
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "`inputs` is torch.float32 but the model's parameters are" in notes


@pytest.mark.parametrize(
    "convert, hint",
    [
        (lambda x: x.permute(0, 2, 3, 1).contiguous(), "pass inputs.permute(0, 3, 1, 2)"),
        (lambda x: x[0], "lacks the batch dimension; pass inputs.unsqueeze(0)"),
    ],
    ids=["channels-last", "no-batch-dimension"],
)
@pytest.mark.parametrize("name", ["GradCAM", "gradtrust"])
def test_a_layout_mistake_is_named_beside_torchs_error(name, convert, hint, bundled_model):
    """Images in (N, H, W, C) (as from PIL through numpy) or one (C, H, W) image: torch's
    error comes from the first convolution or the linear layer; the note says what to do."""
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError) as info:
        CALLS[name](bundled_model, convert(x))
    assert hint in "\n".join(getattr(info.value, "__notes__", []))


@pytest.mark.parametrize(
    "name, call",
    [
        (
            "model_randomisation",
            lambda m, x: model_randomisation(lambda net: GradCAM(net, net.features[3]), m, x),
        ),
        (
            "class_sensitivity",
            lambda m, x: class_sensitivity(lambda net: GradCAM(net, net.features[3]), m, x),
        ),
        ("weight_gradient_norm", lambda m, x: weight_gradient_norm(m, x, torch.zeros(len(x)))),
        (
            "score_dataset",
            lambda m, x: score_dataset(
                m, DataLoader(TensorDataset(x)), scores="softmax", progress=False
            ),
        ),
    ],
)
def test_the_sanity_checks_and_dataset_scores_name_a_dtype_mismatch_too(name, call, tiny_inputs):
    """These ran the model on the inputs themselves and gave torch's bare "Input type
    (float) and bias type (double) should be the same" without the note naming `inputs`."""
    model = make_tiny_cnn().eval()  # float64
    with pytest.raises(RuntimeError, match="should be the same") as info:
        call(model, tiny_inputs.float())
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "`inputs` is torch.float32 but the model's parameters are" in notes
