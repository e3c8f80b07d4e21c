"""The other findings fixed with the train-mode warning: VOICE(GuidedBackprop) names the
activations it does not guide, VOICE refuses inputs without a spatial dimension before the
model runs (its layer methods excepted), the CAMs' ``interpolate_mode`` refusal names the
default per rank, and ``road_imputation`` draws its noise seed for images without channels
as for any other images."""

from __future__ import annotations

import warnings

import pytest
import torch
from captum.attr import GuidedBackprop, NoiseTunnel, Saliency
from torch import nn

from captum_ext.attr import VOICE, GradCAM
from captum_ext.metrics import road_imputation


def _cnn(activation: type[nn.Module], gate: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        activation(),
        nn.Sigmoid() if gate else nn.Identity(),  # a gate: not a hidden activation
        nn.Conv2d(4, 4, 3, padding=1),
        activation(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).eval()


IMAGES = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))


def _user_warnings(call) -> list[str]:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        call()
    return [str(w.message) for w in record if "GuidedBackprop" in str(w.message)]


# ------------------------------------------------------------------ VOICE(GuidedBackprop)


def test_guided_voice_warns_on_a_model_without_relus():
    """Guided backpropagation guides nn.ReLU modules only: on a SiLU network the gradient is
    the plain one (Captum's GuidedBackprop equals it), and the warning says so."""
    model = _cnn(nn.SiLU)
    (message,) = _user_warnings(lambda: VOICE(GuidedBackprop(model)).attribute(IMAGES))
    assert message.startswith("VOICE(GuidedBackprop):")
    assert "has 0 of them" in message and "(2 SiLU)" in message
    assert "exactly the plain input gradient" in message
    x = IMAGES.clone().requires_grad_(True)
    (plain,) = torch.autograd.grad(model(x)[:, 0].sum(), x)
    guided = GuidedBackprop(model).attribute(IMAGES, target=0)
    torch.testing.assert_close(guided, plain)  # what the warning says


def test_guided_voice_warns_on_a_model_with_relus_and_others():
    model = _cnn(nn.ReLU)
    model[4] = nn.GELU()
    (message,) = _user_warnings(lambda: VOICE(GuidedBackprop(model)).attribute(IMAGES))
    assert "has 1 of them" in message and "(1 GELU)" in message and "partly" in message


def test_guided_voice_is_silent_on_a_relu_model_with_gates():
    assert (
        _user_warnings(lambda: VOICE(GuidedBackprop(_cnn(nn.ReLU, gate=True))).attribute(IMAGES))
        == []
    )


# ------------------------------------------------------------------ VOICE on tabular inputs

SPATIAL = (
    r"needs `inputs` with at least one spatial dimension.*got shape \(4, 10\).*tabular \(N, F\)"
)


@pytest.mark.parametrize(
    "method",
    [Saliency, GuidedBackprop, lambda m: NoiseTunnel(Saliency(m))],
    ids=["Saliency", "GuidedBackprop", "NoiseTunnel"],
)
def test_voice_refuses_tabular_inputs_before_the_model_runs(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    with pytest.raises(ValueError, match=SPATIAL):
        VOICE(method(model)).attribute(torch.randn(4, 10))
    assert calls == []


def _tabular_model_with_a_spatial_layer() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Unflatten(1, (1, 4, 4)),
        nn.Conv2d(1, 3, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(48, 3),
    ).eval()


def test_voice_cam_on_tabular_inputs_refuses_the_upsampling_early():
    """The reference post-processing upsamples a CAM's maps to the inputs' size, which (N, F)
    inputs do not have: refused before the model runs, with the way to keep the maps."""
    model = _tabular_model_with_a_spatial_layer()
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    with pytest.raises(ValueError, match=r"VOICE\(GradCAM\) needs.*postprocess='raw'"):
        VOICE(GradCAM(model, "1")).attribute(torch.randn(2, 16))
    assert calls == []


def test_voice_takes_signals_and_raw_cams_of_tabular_models():
    """One spatial dimension is enough (a signal (N, C, L)); with postprocess='raw' a CAM's
    maps stay at its layer, so a tabular model whose layer is spatial is explained."""
    torch.manual_seed(0)
    signal_model = nn.Sequential(
        nn.Conv1d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).eval()
    result = VOICE(Saliency(signal_model)).attribute(torch.randn(2, 2, 8))
    assert result.explanation.shape == (2, 2, 8) and result.iou.shape == (2,)
    model = _tabular_model_with_a_spatial_layer()
    result = VOICE(GradCAM(model, "1"), postprocess="raw").attribute(torch.randn(2, 16))
    assert result.explanation.shape == (2, 1, 4, 4) and result.iou.shape == (2,)


# ------------------------------------------------------------------ interpolate_mode refusal


def test_interpolate_mode_refusal_names_the_default_per_rank():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).eval()
    signals = torch.randn(2, 2, 8)
    with pytest.raises(ValueError) as caught:
        GradCAM(model, "0").attribute(signals, target=0, interpolate_mode="nearest")
    message = str(caught.value)
    assert "'linear', 'bilinear' or 'trilinear' for 1-D, 2-D or 3-D maps" in message
    assert "upsample_to_input's is 'bilinear'" not in message
    # the claim for 1-D maps: the default upsampling is linear
    default = GradCAM(model, "0").attribute(signals, target=0, upsample_to_input=True)
    linear = GradCAM(model, "0").attribute(
        signals, target=0, upsample_to_input=True, interpolate_mode="linear"
    )
    assert torch.equal(default, linear)


# ------------------------------------------------------------------ road_imputation, C = 0


@pytest.mark.parametrize("solver", ["direct", "block", "cg", "nested", "multigrid"])
def test_road_imputation_without_channels_draws_the_noise_seed(solver):
    """One seed is drawn from ``generator`` per call with noise > 0, none with noise 0:
    images without channels advance it as images with channels do."""
    removed = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(0)) < 0.5

    def after(channels: int, noise: float) -> torch.Tensor:
        generator = torch.Generator().manual_seed(3)
        filled = road_imputation(
            torch.rand(2, channels, 8, 8), removed, noise=noise, solver=solver, generator=generator
        )
        assert filled.shape == (2, channels, 8, 8)
        return torch.rand(4, generator=generator)

    assert torch.equal(after(0, 0.1), after(1, 0.1))
    assert torch.equal(after(0, 0.0), after(1, 0.0))
    assert not torch.equal(after(0, 0.1), after(0, 0.0))
