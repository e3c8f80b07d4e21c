"""Which explainers the sanity checks hand their classes to as ``contrast``: the package's
contrastive explainers (ContrastCAM, Contrastive, their subclasses), also inside Captum's
NoiseTunnel, which passes ``contrast`` on. An explainer of the user's that takes ``target``
(keyword-only too) and an optional ``contrast`` gets ``target``, as before."""

from __future__ import annotations

import pytest
import torch
from captum.attr import NoiseTunnel, Saliency

from captum_ext.attr import ContrastCAM
from captum_ext.metrics import class_sensitivity, model_randomisation
from captum_ext.metrics.sanity import _takes_contrast_instead_of_target


class KeywordOnlyTarget:
    """A user's explainer: keyword-only ``target``, optional ``contrast`` for a difference
    map; records what each call receives."""

    log: list = []

    def __init__(self, model) -> None:
        self.saliency = Saliency(model)

    def attribute(self, inputs, *, target=None, contrast=None):
        KeywordOnlyTarget.log.append((target, contrast))
        maps = self.saliency.attribute(inputs, target=target)
        return maps if contrast is None else maps - self.saliency.attribute(inputs, target=contrast)


class PositionalTarget(KeywordOnlyTarget):
    def attribute(self, inputs, target=None, contrast=None):
        return super().attribute(inputs, target=target, contrast=contrast)


class MyContrastCAM(ContrastCAM):
    """A subclass of the package's contrastive CAM: contrastive too."""


@pytest.fixture
def images(bundled_digits):
    return bundled_digits[0][::10][:4]


@pytest.mark.parametrize("explainer", [KeywordOnlyTarget, PositionalTarget])
def test_an_explainer_that_takes_target_gets_target(bundled_model, images, explainer):
    KeywordOnlyTarget.log = []
    result = class_sensitivity(explainer, bundled_model, images)
    ((target, contrast),) = KeywordOnlyTarget.log  # one call on the stacked inputs
    assert contrast is None
    assert torch.equal(target, torch.cat([result.target, result.contrast]))
    KeywordOnlyTarget.log = []
    model_randomisation(explainer, bundled_model, images, layers=["classifier"])
    assert all(
        contrast is None and target is not None for target, contrast in KeywordOnlyTarget.log
    )
    with torch.no_grad():
        predicted = bundled_model(images).argmax(dim=1)
    assert torch.equal(KeywordOnlyTarget.log[0][0], predicted)


def test_contrastive_explainers_are_recognised_by_class(bundled_model, bundled_cam_layer):
    cam = ContrastCAM(bundled_model, bundled_cam_layer)
    assert _takes_contrast_instead_of_target(cam)
    assert _takes_contrast_instead_of_target(MyContrastCAM(bundled_model, bundled_cam_layer))
    assert _takes_contrast_instead_of_target(NoiseTunnel(cam))
    assert not _takes_contrast_instead_of_target(NoiseTunnel(Saliency(bundled_model)))
    assert not _takes_contrast_instead_of_target(KeywordOnlyTarget(bundled_model))


def test_randomisation_runs_noise_tunnel_around_contrast_cam(
    bundled_model, bundled_cam_layer, images
):
    """NoiseTunnel(ContrastCAM) gets the trained model's runner-up as ``contrast`` (passed
    on by NoiseTunnel, expanded with the noisy copies): with ``stdevs=0`` its maps are
    ContrastCAM's against that class."""
    with torch.no_grad():
        trained_runner_up = bundled_model(images).sort(dim=1, descending=True).indices[:, 1]
    curves = model_randomisation(
        lambda m: NoiseTunnel(ContrastCAM(m, bundled_cam_layer)),
        bundled_model,
        images,
        layers=["classifier"],
        attribute_kwargs={"nt_samples": 2, "stdevs": 0.0},
    )
    cam = ContrastCAM(bundled_model, bundled_cam_layer)
    expected = cam.attribute(images, contrast=trained_runner_up, upsample_to_input=True)
    torch.testing.assert_close(curves.original, expected.double(), rtol=1e-5, atol=1e-6)
    assert curves.randomised.shape[0] == 1


def test_class_sensitivity_runs_noise_tunnel_around_contrast_cam(
    bundled_model, bundled_cam_layer, images
):
    result = class_sensitivity(
        lambda m: NoiseTunnel(ContrastCAM(m, bundled_cam_layer)),
        bundled_model,
        images,
        attribute_kwargs={"nt_samples": 2, "stdevs": 0.0},
    )
    plain = class_sensitivity(lambda m: ContrastCAM(m, bundled_cam_layer), bundled_model, images)
    assert torch.equal(result.contrast, plain.contrast)
    torch.testing.assert_close(result.target_maps, plain.target_maps, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.contrast_maps, plain.contrast_maps, rtol=1e-5, atol=1e-6)
