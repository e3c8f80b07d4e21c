"""Arguments a fuzzing audit found refused late, by Python or torch internals, or not at all:
each is now refused by name before any work is done (or, for numpy scalars, accepted as the
Python value of the same number).

- ``LayerIBA.attribute(sigma=...)``: the blur kernel has side ``2 round(2 sigma) + 1``; a
  sigma whose padding ``round(2 sigma)`` reaches the layer's map size is refused from sigma
  alone, before the kernel's taps are built (sigma=1e7 built 4e7 taps, sigma=1e300
  overflowed inside torch).
- ``LayerIBA.attribute``'s flags take numpy bools.
- ``MaskedInputNet`` checks its arguments as the oracle factories do.
- ``upsample_bits(bits, 28)`` reads an int as both sides, as ``F.interpolate`` does.
- ``pixel_range`` names ``low`` / ``high``; ``interaction_oracle`` names the relation
  ``size >= 2 * patch`` between its two arguments.
- ``FinerCAM(alpha=...)``: an alpha whose product with the logits, or with their gradients,
  overflows is refused by name instead of giving all-NaN maps.
- ``class_sensitivity`` / ``model_randomisation`` refuse ``target`` in ``attribute_kwargs``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from captum.attr import Saliency
from torch import nn

import captum_ext.attr.layer_iba as layer_iba
from captum_ext.attr import FinerCAM, LayerIBA, upsample_bits
from captum_ext.inversion import pixel_range
from captum_ext.metrics import class_sensitivity, model_randomisation
from captum_ext.testing import MaskedInputNet, interaction_oracle

# ------------------------------------------------------------------ a small CNN


class _Net(nn.Module):
    """Two 3 x 3 convolutions (a 6 x 6 map at ``conv2``) and a linear head of 4 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 5, 3, padding=1)
        self.fc = nn.Linear(5, 4)

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.conv(x))))
        return self.fc(h.mean(dim=(2, 3)))


def _model_and_inputs():
    torch.manual_seed(0)
    return _Net().eval(), torch.randn(3, 3, 6, 6)


def _iba():
    model, x = _model_and_inputs()
    iba = LayerIBA(model, model.conv2)
    iba.estimate(torch.randn(16, 3, 6, 6))
    return iba, x


# ------------------------------------------------------------------ LayerIBA sigma


@pytest.mark.parametrize("sigma", [1e7, 1e300, 1.7e308])
def test_iba_sigma_wider_than_the_map_is_refused_before_the_taps_are_built(sigma, monkeypatch):
    # a 6 x 6 map takes the reflection padding pad = round(2 sigma) below 6: sigma=1.5
    # (side 7) blurs, sigma=3 (side 13) is refused with its exact side
    iba, x = _iba()
    assert iba.attribute(x, target=0, steps=1, n_noise=1, sigma=1.5).shape == (3, 1, 6, 6)
    with pytest.raises(ValueError, match="`sigma`=3 needs a blur of side 13"):
        iba.attribute(x, target=0, steps=1, n_noise=1, sigma=3.0)

    def taps_built(sigma):
        raise AssertionError(f"gaussian_taps({sigma:g}) built before the size check")

    # round(2 sigma) >= 6 for these sigmas: refused from sigma alone
    monkeypatch.setattr(layer_iba, "gaussian_taps", taps_built)
    with pytest.raises(ValueError, match=r"`sigma`=.*too large for the layer's 6 x 6 maps"):
        iba.attribute(x, target=0, steps=1, n_noise=1, sigma=sigma)


# ------------------------------------------------------------------ LayerIBA flags


@pytest.mark.parametrize("flag", ["post_relu", "inverse", "upsample_to_input", "reuse_prefix"])
def test_iba_flags_take_numpy_bools(flag):
    iba, x = _iba()
    expected = iba.attribute(x, target=0, steps=2, n_noise=2, generator=0, **{flag: True})
    got = iba.attribute(x, target=0, steps=2, n_noise=2, generator=0, **{flag: np.True_})
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with pytest.raises(TypeError, match=f"`{flag}`"):  # "False" is truthy: still refused
        iba.attribute(x, target=0, steps=1, n_noise=1, **{flag: "False"})


# ------------------------------------------------------------------ MaskedInputNet


def _keep(size=8):
    keep = torch.ones(1, 1, size, size)
    keep[..., size // 2 :] = 0
    return keep


def test_masked_input_net_takes_a_numpy_seed_as_the_int():
    x = torch.rand(2, 3, 8, 8)
    keep = _keep()
    net = MaskedInputNet(keep, 3, 4, np.int64(0))
    torch.testing.assert_close(net(x), MaskedInputNet(_keep(), 3, 4, 0)(x))
    keep.fill_(1.0)  # the network keeps its own copy of the mask
    assert float(net.keep.sum()) == 32.0


@pytest.mark.parametrize(
    ("args", "error", "argument"),
    [
        ((_keep(), 3, 4, True), TypeError, "seed"),
        ((_keep(), 3, 4, "0"), TypeError, "seed"),
        ((_keep(), 3, 4, -1), ValueError, "seed"),
        ((_keep(), -1, 4, 0), ValueError, "channels"),
        ((_keep(), 3.0, 4, 0), TypeError, "channels"),
        ((_keep(), 3, None, 0), TypeError, "classes"),
        ((_keep().numpy(), 3, 4, 0), TypeError, "keep"),
        ((_keep().to(torch.complex64), 3, 4, 0), TypeError, "keep"),
        ((torch.ones(2, 8, 8), 3, 4, 0), ValueError, "keep"),
        ((torch.ones(1, 2, 8, 8), 3, 4, 0), ValueError, "keep"),
        ((torch.ones(1, 1, 1, 8, 8), 3, 4, 0), ValueError, "keep"),
        ((torch.ones(1, 1, 0, 8), 3, 4, 0), ValueError, "keep"),
        ((torch.full((1, 1, 8, 8), float("nan")), 3, 4, 0), ValueError, "keep"),
    ],
)
def test_masked_input_net_refuses_bad_arguments_by_name(args, error, argument):
    with pytest.raises(error, match=f"`{argument}`"):
        MaskedInputNet(*args)


def _column_keep(size=8):
    """``(H, W)``: 1 on the left half of the columns, 0 on the right half."""
    keep = torch.ones(size, size)
    keep[:, size // 2 :] = 0
    return keep


@pytest.mark.parametrize(
    "keep",
    [
        _column_keep(),  # (H, W)
        _column_keep()[None],  # (1, H, W)
        _column_keep().expand(3, 8, 8),  # (C, H, W)
        _column_keep()[None, None],  # (1, 1, H, W)
        _column_keep()[:1][None, None],  # (1, 1, 1, W): a column mask
        _column_keep()[None, None].bool(),
        _column_keep()[None, None].expand(2, 1, 8, 8),  # (N, 1, H, W): per example
        torch.tensor(0.5),  # a scalar scales every pixel
    ],
    ids=["HW", "1HW", "CHW", "11HW", "111W", "bool", "N1HW", "scalar"],
)
def test_masked_input_net_takes_every_keep_that_broadcasts_against_the_inputs(keep):
    # the network's definition: head(mean over (H, W) of features(x * keep)), with torch's
    # broadcasting of `keep` as given (what forward computed before keep was checked)
    x = torch.rand(2, 3, 8, 8)
    net = MaskedInputNet(keep, 3, 4, 0)
    expected = net.head(net.features(x * keep).mean(dim=(2, 3)))
    torch.testing.assert_close(net(x), expected, rtol=0, atol=0)
    assert net.keep.dim() == 4  # brought to 4-D with leading 1s, as broadcasting does


def test_masked_input_net_names_keep_for_inputs_it_does_not_broadcast_against():
    net = MaskedInputNet(_column_keep()[None, None].expand(2, 1, 8, 8), 3, 4, 0)
    with pytest.raises(ValueError, match=r"`keep` mask \(2, 1, 8, 8\) is for \(2, C, 8, 8\)"):
        net(torch.rand(3, 3, 8, 8))


def test_masked_input_net_names_keep_for_inputs_of_another_size():
    net = MaskedInputNet(_keep(4), 3, 4, 0)
    with pytest.raises(ValueError, match=r"`keep` mask \(1, 1, 4, 4\) is for \(N, C, 4, 4\)"):
        net(torch.rand(2, 3, 8, 8))


@pytest.mark.parametrize(
    "shape", [(2, 3, 1, 1), (2, 3, 8, 1), (1, 3, 8, 8)], ids=["1x1", "one-column", "batch-of-1"]
)
def test_masked_input_net_does_not_expand_inputs_to_the_mask(shape):
    """Inputs that broadcast against ``keep`` only by being enlarged (1 x 1 images, a batch
    of 1 against a mask of 2 examples) were expanded into its shape, and scored."""
    keep = _column_keep()[None, None]
    if shape[0] == 1:
        keep = keep.expand(2, 1, 8, 8)
    net = MaskedInputNet(keep, 3, 4, 0)
    with pytest.raises(ValueError, match=r"`keep` mask"):
        net(torch.rand(*shape))


# ------------------------------------------------------------------ small messages


def test_upsample_bits_reads_an_int_size_as_both_sides():
    bits = torch.rand(1, 1, 7, 7)
    torch.testing.assert_close(upsample_bits(bits, 28), upsample_bits(bits, (28, 28)))


@pytest.mark.parametrize("size", ["28", None, [28.5, 28]])
def test_upsample_bits_names_size(size):
    with pytest.raises((TypeError, ValueError), match="`size`"):
        upsample_bits(torch.rand(1, 1, 7, 7), size)


@pytest.mark.parametrize(
    ("keywords", "argument"),
    [({"low": None}, "low"), ({"high": "1"}, "high"), ({"high": torch.ones(2)}, "high")],
)
def test_pixel_range_names_its_bounds(keywords, argument):
    with pytest.raises(TypeError, match=f"`{argument}`"):
        pixel_range(torch.rand(1, 1, 4, 4), **keywords)
    # L_pix = mean(relu(low - x)^2 + relu(x - high)^2): 0.5 above high=1 on one of 4
    # pixels; numpy, infinite and one-element tensor bounds are read as the numbers
    images = torch.tensor([[[[-0.5, 0.5, 1.5, 1.0]]]])
    for low, high in [(-np.inf, np.float32(1.0)), (torch.tensor(-1.0), 1)]:
        assert float(pixel_range(images, low=low, high=high)) == 0.0625
    with pytest.raises(ValueError, match="`low`"):
        pixel_range(images, low=float("nan"))


def test_interaction_oracle_names_size_and_patch_in_their_relation():
    with pytest.raises(ValueError, match=r"`size`=12 and `patch`=12.*size >= 2 \* patch"):
        interaction_oracle(patch=12)


# ------------------------------------------------------------------ FinerCAM alpha


@pytest.mark.parametrize("alpha", [1e39, 1e300, -1e300])
def test_finer_cam_alpha_overflowing_the_scores_is_refused(alpha):
    # float32 logits: alpha is already inf in float32, so alpha * z_j is inf or NaN
    model, x = _model_and_inputs()
    with pytest.raises(ValueError, match="`alpha`=.*overflows torch.float32"):
        FinerCAM(model, model.conv2, alpha=alpha).attribute(x, target=[0, 1, 2])


def test_finer_cam_alpha_overflowing_the_gradients_is_refused():
    # Without biases the network is positively homogeneous: inputs scaled by 1e-6 and a head
    # scaled by 1e6 keep the logits (|z| < 10, so alpha z_j = 1e36 z_j is finite in
    # float32), while the gradient of z at conv2 grows by 1e6: alpha times it overflows
    model, x = _model_and_inputs()
    with torch.no_grad():
        model.conv.bias.zero_()
        model.conv2.bias.zero_()
        model.fc.bias.zero_()
        model.fc.weight.mul_(1e6)
        x = x * 1e-6
        assert float(model(x).abs().max()) < 10.0
    maps = FinerCAM(model, model.conv2, alpha=1e6).attribute(x, target=[0, 1, 2])
    assert bool(torch.isfinite(maps).all())  # a large alpha that does not overflow passes
    with pytest.raises(ValueError, match=r"`alpha`=1e\+36: .* are inf or NaN for finite inputs"):
        FinerCAM(model, model.conv2, alpha=1e36).attribute(x, target=[0, 1, 2])


class _SqrtPooled(nn.Module):
    """sqrt of pooled ReLU features (as bilinear CNNs for fine-grained classes do), with 3
    dead channels: d sqrt(u) / du = 1 / (2 sqrt(u)) is inf at u = 0, so the gradients at
    ``relu`` are inf or NaN whatever the score's scale (alpha=1 included)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(8, 10)
        with torch.no_grad():
            self.conv.bias[:3].fill_(-100.0)

    def forward(self, x):
        return self.fc(torch.sqrt(self.relu(self.conv(x)).mean((2, 3))))


@pytest.mark.parametrize("alpha", [1.5, -2.0, 100.0])
def test_finer_cam_does_not_blame_alpha_for_the_models_own_infinite_gradients(alpha):
    torch.manual_seed(0)
    model, x = _SqrtPooled().eval(), torch.rand(3, 3, 8, 8)
    at_one = FinerCAM(model, "relu", alpha=1.0).attribute(x)
    assert not bool(torch.isfinite(at_one).any())  # the model's doing: NaN at alpha=1 too
    # |alpha| * max(1, |z|) is far below sqrt(float32 max) = 1.8e19: alpha is not the cause
    maps = FinerCAM(model, "relu", alpha=alpha).attribute(x)
    assert maps.shape == at_one.shape and not bool(torch.isfinite(maps).any())


# ------------------------------------------------------------------ sanity checks


@pytest.mark.parametrize("check", [class_sensitivity, model_randomisation])
@pytest.mark.parametrize("keyword", ["target", "inputs"])
def test_sanity_checks_refuse_their_own_keywords_in_attribute_kwargs(check, keyword):
    model, x = _model_and_inputs()
    with pytest.raises(ValueError, match=f"`attribute_kwargs` sets '{keyword}'.*`{keyword}`"):
        check(Saliency, model, x, similarity="spearman_abs", attribute_kwargs={keyword: 1})


def test_class_sensitivity_points_to_contrast_for_the_second_class():
    model, x = _model_and_inputs()
    with pytest.raises(ValueError, match="`contrast` for the second class"):
        class_sensitivity(
            Saliency, model, x, similarity="spearman_abs", attribute_kwargs={"target": 1}
        )


def test_sanity_checks_refuse_attribute_kwargs_that_are_not_a_mapping():
    model, x = _model_and_inputs()
    with pytest.raises(TypeError, match="`attribute_kwargs`"):
        class_sensitivity(Saliency, model, x, similarity="spearman_abs", attribute_kwargs=[1])
    # other keywords still reach `attribute`
    result = class_sensitivity(
        Saliency, model, x, similarity="spearman_abs", attribute_kwargs={"abs": False}
    )
    assert result.target_maps.shape[0] == 3
