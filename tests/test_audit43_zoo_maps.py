"""Maps over the feature axis, and a NaN of tiny features (audit 43, model zoo).

- LayerIBA on a channels-last (N, h, w, C) layer (a Swin stage) read it as (N, C, h, w)
  and returned bits over (w, C); it now warns, naming ``reshape_transform``, as the CAMs do
  (a warning, not a refusal: the shape heuristic also matches channels-first layers, such as
  a spectrogram network's that pools over frequency only; a given ``reshape_transform`` is
  the user's choice of layout and is not checked).
- Contrastive(LayerGradCam) (Captum's, which sums over dimension 1) on a transformer's
  tokens or a channels-last layer returned "maps" over the features; it now warns, naming
  ``Contrastive(GradCAM, ..., reshape_transform=)``, and computes as before (a Conv1d over
  image rows looks like tokens). Layer methods whose attributions have
  the layer's own shape (LayerIntegratedGradients) still explain token layers.
- gradtrust(form="reference")'s closed form tested Var(h^2) == 0 in float32, which
  underflows for features of about 1e-11: NaN where autograd (and float64) give a score.

The models are tiny stand-ins: a convolution whose output is permuted to channels-last and
normalised (as a Swin stage), and a patch-token model with a class token (as a ViT).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from _helpers import assert_model_unchanged, model_snapshot
from captum.attr import GuidedGradCam, LayerGradCam, LayerIntegratedGradients, NoiseTunnel
from torch import nn

from captum_ext.attr import Contrastive, GradCAM, LayerIBA
from captum_ext.metrics import gradtrust

pytestmark = pytest.mark.usefixtures("one_thread")


class Permute(nn.Module):
    def __init__(self, *dims: int) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return x.permute(*self.dims)


class ChannelsLastNet(nn.Module):
    """16 x 16 images -> conv (N, 8, 4, 4) -> channels-last (N, 4, 4, 8) `norm` -> back to
    (N, 8, 4, 4) `unpermute` -> pooled logits: `norm` is laid out as a Swin stage."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 4, stride=4)
        self.permute = Permute(0, 2, 3, 1)
        self.norm = nn.LayerNorm(8)
        self.unpermute = Permute(0, 3, 1, 2)
        self.act = nn.GELU()
        self.fc = nn.Linear(8 * 16, 5)

    def forward(self, x):
        x = self.unpermute(self.norm(self.permute(self.conv(x))))
        return self.fc(self.act(x).flatten(1))


class TokenNet(nn.Module):
    """16 x 16 images -> 4 x 4 patch tokens of 12 features after a class token: `ln` outputs
    (N, 17, 12), as a ViT block's norm."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 12, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, 12))
        self.ln = nn.LayerNorm(12)
        self.fc = nn.Linear(12 * 17, 5)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(len(x), -1, -1), tokens], dim=1)
        return self.fc(torch.tanh(self.ln(tokens)).flatten(1))


def _seeded(cls):
    torch.manual_seed(0)
    return cls().eval()


@pytest.fixture
def channels_last():
    return _seeded(ChannelsLastNet)


@pytest.fixture
def tokens():
    return _seeded(TokenNet)


def _images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------ LayerIBA


def _iba(model, layer):
    iba = LayerIBA(model, layer)
    iba.estimate(torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(2)))
    return iba


def test_layer_iba_warns_of_a_channels_last_layer(channels_last):
    iba = _iba(channels_last, "norm")
    before = model_snapshot(channels_last)
    for sigma in (1.0, None):  # the default blur, and none: both read (w, C) as the map
        with pytest.warns(UserWarning, match=r"looks like a channels-last") as record:
            bits = iba.attribute(_images(), steps=2, n_noise=2, generator=0, sigma=sigma)
        (warning,) = [w for w in record if "LayerIBA" in str(w.message)]
        assert warning.filename == __file__  # the user's line
        message = str(warning.message)
        assert "reshape_transform=lambda t: t.permute(0, 3, 1, 2)" in message
        assert "sigma=None" in message
        assert "(2, 4, 4, 8)" in message
        assert bits.shape == (2, 1, 4, 8)  # computed as before: the layer read as N x C x h x w
    assert_model_unchanged(channels_last, before)


def test_layer_iba_takes_an_explicit_reshape_transform_as_the_layout(channels_last):
    iba = _iba(channels_last, "norm")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bits = iba.attribute(
            _images(), steps=2, n_noise=2, generator=0, sigma=None, reshape_transform=lambda t: t
        )
    assert bits.shape == (2, 1, 4, 8)


def test_layer_iba_channels_last_layer_with_the_advised_permute(channels_last):
    iba = _iba(channels_last, "norm")
    bits = iba.attribute(
        _images(),
        steps=3,
        n_noise=2,
        generator=0,
        sigma=None,
        reshape_transform=lambda t: t.permute(0, 3, 1, 2),
    )
    assert bits.shape == (2, 1, 4, 4)  # a map over the 4 x 4 positions
    assert bool(torch.isfinite(bits).all()) and bool((bits >= 0).all())
    # the channels-first layer after it is explained as it was
    assert _iba(channels_last, "unpermute").attribute(
        _images(), steps=2, n_noise=2, generator=0
    ).shape == (2, 1, 4, 4)


# ------------------------------------------------------------------------ Contrastive


def test_contrastive_layer_gradcam_warns_of_a_channels_last_layer(channels_last):
    before = model_snapshot(channels_last)
    for method in (
        Contrastive(LayerGradCam, channels_last, channels_last.norm),
        Contrastive(NoiseTunnel(LayerGradCam(channels_last, channels_last.norm))),
        Contrastive(GuidedGradCam, channels_last, channels_last.norm),
    ):
        kwargs = {"nt_samples": 2} if isinstance(method.method, NoiseTunnel) else {}
        with pytest.warns(UserWarning, match="looks like a channels-last") as record:
            method.attribute(_images(), contrast=[1, 2], **kwargs)
        (warning,) = [w for w in record if "channels-last" in str(w.message)]  # once a call
        assert warning.filename == __file__
        assert "reshape_transform=lambda t: t.permute(0, 3, 1, 2)" in str(warning.message)
        assert "Contrastive(GradCAM" in str(warning.message)
    # the input of `unpermute` is the channels-last grid too; its output is N x C x h x w
    cam = Contrastive(LayerGradCam, channels_last, channels_last.unpermute)
    with pytest.warns(UserWarning, match="receives inputs.*channels-last"):
        cam.attribute(_images(), contrast=[1, 2], attribute_to_layer_input=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cam.attribute(_images(), contrast=[1, 2]).shape == (2, 1, 4, 4)
    assert_model_unchanged(channels_last, before)


def test_contrastive_gradcam_with_the_advised_transform_equals_the_channels_first_map(
    channels_last,
):
    x = _images()
    advised = Contrastive(GradCAM, channels_last, channels_last.norm).attribute(
        x,
        contrast=[1, 2],
        reshape_transform=lambda t: t.permute(0, 3, 1, 2),
        relu_attributions=False,
    )
    channels_first = Contrastive(LayerGradCam, channels_last, channels_last.unpermute).attribute(
        x, contrast=[1, 2]
    )
    assert advised.shape == (2, 1, 4, 4)
    torch.testing.assert_close(advised, channels_first, rtol=1e-5, atol=1e-7)


def test_contrastive_layer_gradcam_warns_of_tokens(tokens):
    before = model_snapshot(tokens)
    for contrast in ([1, 2], "all"):
        with pytest.warns(UserWarning, match="looks like a transformer's tokens") as record:
            Contrastive(LayerGradCam, tokens, tokens.ln).attribute(_images(), contrast=contrast)
        fold = "lambda t: t[:, 1:].transpose(1, 2).unflatten(2, (4, 4))"
        assert any(f"reshape_transform={fold}" in str(w.message) for w in record)
    assert_model_unchanged(tokens, before)
    # the advice works
    maps = Contrastive(GradCAM, tokens, tokens.ln).attribute(
        _images(),
        contrast=[1, 2],
        reshape_transform=lambda t: t[:, 1:].transpose(1, 2).unflatten(2, (4, 4)),
        relu_attributions=False,
    )
    assert maps.shape == (2, 1, 4, 4)


def test_contrastive_layer_methods_of_the_layer_shape_still_explain_tokens(tokens):
    attr = Contrastive(LayerIntegratedGradients, tokens, tokens.ln).attribute(
        _images(), contrast=[1, 2], n_steps=4
    )
    assert attr.shape == (2, 17, 12)  # one attribution per token feature, as documented


# ------------------------------------------------- channels-first layers the heuristic matches


class Spectrogram(nn.Module):
    """(N, 1, 128 mel, 64 frames) -> convolutions pooling over frequency only: `layer`
    outputs (N, 16, 8, 64), channels-first although dims 1 and 2 keep the input's 2:1."""

    def __init__(self) -> None:
        super().__init__()
        blocks, c = [], 1
        for _ in range(4):
            blocks += [nn.Conv2d(c, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d((2, 1))]
            c = 16
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))

    def forward(self, x):
        return self.head(self.features(x))


class RowNet(nn.Module):
    """(N, 1, 32, 32) images read row by row: Conv1d(32, 16) outputs (N, 16, 32) at `act`."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(32, 16, 3, padding=1)
        self.act = nn.ReLU()
        self.head = nn.Sequential(nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(16, 4))

    def forward(self, x):
        return self.head(self.act(self.conv(x[:, 0])))


def _spectrogram():
    model = _seeded(Spectrogram)
    x = torch.randn(3, 1, 128, 64, generator=torch.Generator().manual_seed(3))
    return model, model.features[11], x


def _contrast_by_hand(model, layer, x, contrast):
    """Captum's LayerGradCam of the cross-entropy with label ``contrast``, formed by hand."""

    def cross_entropy(inputs):
        return -torch.log_softmax(model(inputs), dim=1)

    return LayerGradCam(cross_entropy, layer).attribute(x, target=contrast)


def test_layer_iba_runs_on_a_spectrogram_layer_with_a_warning_only():
    model, layer, x = _spectrogram()
    assert model.features[:12](x).shape == (3, 16, 8, 64)
    iba = LayerIBA(model, layer)
    iba.estimate(x)
    with pytest.warns(UserWarning, match=r"looks like a channels-last.*if it is channels-last"):
        warned = iba.attribute(x, steps=3, n_noise=2, generator=0, sigma=None)
    # an explicit reshape_transform is the user's choice of layout: no warning, same bits
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        chosen = iba.attribute(
            x, steps=3, n_noise=2, generator=0, sigma=None, reshape_transform=lambda t: t
        )
    assert warned.shape == (3, 1, 8, 64)
    torch.testing.assert_close(warned, chosen, rtol=0, atol=0)
    with pytest.warns(UserWarning, match="channels-last"):  # the default blur runs too
        assert iba.attribute(x, steps=2, n_noise=2, generator=0).shape == (3, 1, 8, 64)


def test_contrastive_layer_gradcam_on_channels_first_layers_equals_captum_with_a_warning():
    model, layer, x = _spectrogram()
    with pytest.warns(UserWarning, match="looks like a channels-last"):
        maps = Contrastive(LayerGradCam, model, layer).attribute(x, contrast=1)
    torch.testing.assert_close(maps, _contrast_by_hand(model, layer, x, 1))
    assert maps.shape == (3, 1, 8, 64)
    rows = _seeded(RowNet)
    images = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(4))
    with pytest.warns(UserWarning, match="looks like a transformer's tokens"):
        maps = Contrastive(LayerGradCam, rows, rows.act).attribute(images, contrast=1)
    torch.testing.assert_close(maps, _contrast_by_hand(rows, rows.act, images, 1))
    assert maps.shape == (2, 1, 32)


# ------------------------------------------------------------------------ gradtrust


class TinyFeatures(nn.Module):
    def __init__(self, scale: float, constant: bool = False) -> None:
        super().__init__()
        self.body = nn.Linear(8, 32)
        self.fc = nn.Linear(32, 10)
        self.scale, self.constant = scale, constant

    def forward(self, x):
        h = self.body(x)
        h = torch.sign(h) if self.constant else torch.tanh(h)
        return self.fc(h * self.scale)


@pytest.mark.parametrize("scale", [1e-11, 1e-13])
def test_gradtrust_reference_closed_form_on_tiny_features(scale):
    torch.manual_seed(0)
    model = TinyFeatures(scale).eval()
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "every score is NaN" warning
        closed = gradtrust(model, x, form="reference")
    expected = gradtrust(model.double(), x.double(), form="reference", method="autograd")
    assert bool(torch.isfinite(expected).all())
    torch.testing.assert_close(closed.double(), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("scale", [1.0, 1e-11])
def test_gradtrust_reference_constant_features_stay_undefined(scale):
    """|h_j| the same for every j: every energy g_c^4 Var(h^2) is 0, the ratio 0 / 0."""
    torch.manual_seed(0)
    model = TinyFeatures(scale, constant=True).eval()
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    for method in ("auto", "autograd"):
        with pytest.warns(RuntimeWarning, match="every score is NaN"):
            scores = gradtrust(model.double(), x.double(), form="reference", method=method)
        assert bool(torch.isnan(scores).all())
    with pytest.warns(RuntimeWarning, match="every score is NaN"):
        assert bool(torch.isnan(gradtrust(model.float(), x, form="reference")).all())


class _PatchTokens(nn.Module):
    """Patch tokens (N, 64, 16) of 32 x 32 images, 4 x 4 patches, no class token."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 16, 4, stride=4)
        self.block = nn.Linear(16, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        return self.head(torch.relu(self.block(t)).mean(1))


def test_layer_iba_warns_of_a_reshape_transform_that_forgot_its_permute():
    """Tokens folded to N x h x w x D: the maps would run over the features (before this
    release a ValueError; a warning now, as the other layout checks)."""
    model = _seeded(_PatchTokens).eval()
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    iba = LayerIBA(model, model.block)
    iba.estimate(x)
    forgot = lambda t: t.reshape(t.shape[0], 8, 8, 16)  # noqa: E731
    with pytest.warns(UserWarning, match=r"permute\(0, 3, 1, 2\)") as caught:
        iba.attribute(x[:2], target=0, reshape_transform=forgot, sigma=None, generator=[0, 0])
    assert caught[0].filename == __file__
    right = lambda t: t.reshape(t.shape[0], 8, 8, 16).permute(0, 3, 1, 2)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        maps = iba.attribute(x[:2], target=0, reshape_transform=right, sigma=None, generator=[0, 0])
    assert maps.shape == (2, 1, 8, 8)
