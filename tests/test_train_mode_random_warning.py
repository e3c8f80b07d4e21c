"""The train-mode warning (RandomMapsWarning) beyond the plain CAMs: every public method that
runs the model in the caller's mode, and whose result then varies from call to call (VOICE,
PathwayGradient, gradtrust, Contrastive, ActivationMatchingMask), warns once per model when
the model drops at random in train mode: a dropout module, a stochastic-depth / DropBlock /
PatchDropout module (recognised by class name), or timm's functional dropout, a module in
train mode with a positive ``drop_rate`` or ``drop_path_rate`` attribute. A model in eval
mode, or in train mode with batch norm only (deterministic), gets no warning."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from captum.attr import Saliency
from torch import nn

from captum_ext.attr import (
    VOICE,
    ActivationMatchingMask,
    Contrastive,
    GradCAM,
    PathwayGradient,
    RandomMapsWarning,
)
from captum_ext.attr._cam import random_in_train_mode_warning
from captum_ext.metrics import gradtrust


class DropPath(nn.Module):
    """Stands in for timm's DropPath (recognised by its class name): drops an example's whole
    input with probability ``drop_prob`` in train mode."""

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if not self.training or self.drop_prob == 0:
            return x
        keep = torch.rand(x.shape[0], *([1] * (x.dim() - 1))) >= self.drop_prob
        return x * keep / (1 - self.drop_prob)


class DropBlock2d(nn.Module):
    """Stands in for timm's DropBlock2d (its class name and its ``drop_prob``)."""

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if not self.training or self.drop_prob == 0:
            return x
        return x * (torch.rand_like(x[:, :1]) >= self.drop_prob)


class DropBlock(DropBlock2d):
    """The name other libraries (dropblock) give the same module."""


class PatchDropout(nn.Module):
    """Stands in for timm's PatchDropout (its class name and its ``prob``)."""

    def __init__(self, prob: float) -> None:
        super().__init__()
        self.prob = prob

    def forward(self, x):
        return x


class Net(nn.Module):
    """conv -> [norm] -> ReLU -> [random] -> conv -> ReLU -> pool -> [F.dropout] -> linear.
    ``body.4`` is the CAM layer; ``drop_rate`` is timm's functional head dropout."""

    def __init__(
        self, random: nn.Module | None = None, norm: bool = False, drop_rate: float = 0.0
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.BatchNorm2d(6) if norm else nn.Identity(),
            nn.ReLU(),
            random if random is not None else nn.Identity(),
            nn.Conv2d(6, 6, 3, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Linear(6, 4)
        self.drop_rate = drop_rate

    def forward(self, x):
        pooled = self.body(x).mean((2, 3))
        return self.head(F.dropout(pooled, p=self.drop_rate, training=self.training))


IMAGES = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))

#: each public method, run once on ``model`` (each call gets a fresh model: once per model)
METHODS = {
    "GradCAM": lambda model: GradCAM(model, "body.4").attribute(IMAGES, target=0),
    "VOICE(GradCAM)": lambda model: VOICE(GradCAM(model, "body.4")).attribute(IMAGES),
    "VOICE(Saliency)": lambda model: VOICE(Saliency(model)).attribute(IMAGES),
    "PathwayGradient": lambda model: PathwayGradient(model).attribute(IMAGES, target=0),
    "gradtrust": lambda model: gradtrust(model, IMAGES),
    "gradtrust(layer=inner)": lambda model: gradtrust(model, IMAGES, layer="body.4"),
    "gradtrust(layer='all')": lambda model: gradtrust(model, IMAGES, layer="all"),
    "Contrastive(Saliency)": lambda model: Contrastive(Saliency, model).attribute(
        IMAGES, contrast=1
    ),
    "ActivationMatchingMask": lambda model: ActivationMatchingMask(model, ["body.4"]).attribute(
        IMAGES, mode="per_image", steps=2, generator=0
    ),
}


def _random_warnings(model: nn.Module, method: str) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        METHODS[method](model)
    return [w for w in record if issubclass(w.category, RandomMapsWarning)]


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_warns_on_a_train_mode_drop_path_model(method):
    model = Net(DropPath(0.5)).train()
    (warned,) = _random_warnings(model, method)  # once in the call
    message = str(warned.message)
    name = method.split("(layer")[0]
    assert message.startswith(f"{name}:"), message
    assert "'body.3'" in message and "model.eval()" in message
    assert warned.filename == __file__  # the user's line (the lambda above)
    results = {"gradtrust": "scores", "ActivationMatchingMask": "masks"}.get(name, "maps")
    assert f"the {results} are random" in message
    # once per model: the second call on the same model is silent
    assert _random_warnings(model, method) == []
    # the model's modes are left as they were
    assert all(module.training for module in model.modules())


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize(
    "model",
    [lambda: Net(DropPath(0.5)).eval(), lambda: Net(norm=True).train()],
    ids=["eval", "train_batch_norm_only"],
)
def test_no_warning_where_the_results_are_not_random(method, model):
    assert _random_warnings(model(), method) == []


def test_contrastive_around_a_cam_warns_once():
    """Contrastive(GradCAM) runs the model inside its ContrastiveForward: the wrapper and the
    CAM inside it recognise the same user model, so one warning, named after the wrapper."""
    model = Net(DropPath(0.5)).train()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        Contrastive(GradCAM, model, "body.4").attribute(IMAGES, contrast=1)
    (warned,) = [w for w in record if issubclass(w.category, RandomMapsWarning)]
    assert str(warned.message).startswith("Contrastive(GradCAM):")


@pytest.mark.parametrize(
    "random",
    [DropBlock2d(0.2), DropBlock(0.2), PatchDropout(0.2)],
    ids=["DropBlock2d", "DropBlock", "PatchDropout"],
)
def test_drop_block_and_patch_dropout_modules_are_random(random):
    model = Net(random).train()
    message = random_in_train_mode_warning("GradCAM", model)
    assert message is not None and "'body.3'" in message
    random.drop_prob = random.prob = 0.0  # a module that drops nothing
    assert random_in_train_mode_warning("GradCAM", model) is None


def test_timm_functional_head_dropout_warns_with_gradcam():
    """timm's ``F.dropout(x, p=self.drop_rate, training=self.training)``: no module shows it,
    the model's positive ``drop_rate`` in train mode does (the maps do differ)."""
    model = Net(drop_rate=0.5).train()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        first = GradCAM(model, "body.4").attribute(IMAGES, target=0)
        second = GradCAM(model, "body.4").attribute(IMAGES, target=0)
    assert not torch.equal(first, second)  # what the warning says
    (warned,) = [w for w in record if issubclass(w.category, RandomMapsWarning)]
    assert "'Net' (drop_rate=0.5)" in str(warned.message)


@pytest.mark.parametrize("attribute", ["drop_rate", "drop_path_rate"])
def test_drop_rate_attributes_count_in_train_mode_with_a_positive_rate(attribute):
    model = Net().train()
    setattr(model.body[0], attribute, 0.1)
    message = random_in_train_mode_warning("GradCAM", model)
    assert message is not None and f"'body.0' ({attribute}=0.1)" in message
    setattr(model.body[0], attribute, 0.0)  # zero, or not a rate at all: nothing random
    assert random_in_train_mode_warning("GradCAM", model) is None
    setattr(model.body[0], attribute, True)
    assert random_in_train_mode_warning("GradCAM", model) is None
    setattr(model.body[0], attribute, 0.1)
    assert random_in_train_mode_warning("GradCAM", model.eval()) is None


def test_dropblock_package_class_names_are_recognised():
    """The dropblock package names its modules DropBlock2D / DropBlock3D (timm: DropBlock2d)."""
    from captum_ext.attr._cam import _draws_random_masks

    for name in ("DropBlock2D", "DropBlock3D", "DropBlock2d"):
        module = type(name, (torch.nn.Module,), {})()
        module.drop_prob = 0.5
        module.train()
        assert _draws_random_masks(module), name
        module.drop_prob = 0.0
        assert not _draws_random_masks(module), name
