"""The sanity checks run contrastive explainers (ContrastCAM, Contrastive), whose
``attribute`` takes the class as ``contrast`` and refuses ``target``, with a defined
question: model_randomisation explains every model against one contrast Q read from the
trained model (or given); class_sensitivity hands its two classes to ``contrast``."""

from __future__ import annotations

import pytest
import torch
from captum.attr import Saliency
from torch import nn

from captum_ext.attr import ContrastCAM, Contrastive
from captum_ext.metrics import class_sensitivity, model_randomisation
from captum_ext.metrics.sanity import spearman_similarity


def _runner_up_by_hand(logits: torch.Tensor) -> torch.Tensor:
    """The second largest logit's class per row (no ties in these float logits)."""
    return logits.sort(dim=1, descending=True).indices[:, 1]


class _Recording:
    """Contrastive(Saliency) on ``model``, recording the contrast each call gets and the
    runner-up of the model it explains."""

    def __init__(self, model: nn.Module, log: list) -> None:
        self.model, self.log = model, log
        self.method = Contrastive(Saliency, model)

    def attribute(self, inputs, contrast=None, **kwargs):
        with torch.no_grad():
            own_runner_up = _runner_up_by_hand(self.model(inputs))
        self.log.append((contrast.clone(), own_runner_up))
        return self.method.attribute(inputs, contrast=contrast, **kwargs)


def _contrastive_saliency_by_hand(model, images, contrast) -> torch.Tensor:
    maps = Contrastive(Saliency, model).attribute(images.clone(), contrast=contrast)
    return maps.detach().double().sum(dim=1, keepdim=True)


@pytest.fixture
def images(bundled_digits):
    return bundled_digits[0][::10][:4]


def test_randomisation_explains_against_the_trained_runner_up(bundled_model, images):
    with torch.no_grad():
        trained_runner_up = _runner_up_by_hand(bundled_model(images))
    log: list = []
    curves = model_randomisation(
        lambda m: _Recording(m, log), bundled_model, images, layers=["classifier"]
    )
    assert len(log) == 2  # the trained model, then the randomised copy
    for contrast, _ in log:
        assert torch.equal(contrast, trained_runner_up)
    # the randomised copy prefers other classes: its own runner-up is not the question
    assert not torch.equal(log[1][1], trained_runner_up)
    expected = _contrastive_saliency_by_hand(bundled_model, images, trained_runner_up)
    torch.testing.assert_close(curves.original, expected, rtol=0, atol=0)
    by_hand = spearman_similarity(curves.original, curves.randomised[0])
    torch.testing.assert_close(curves.similarity["spearman_abs"][0], by_hand)


def test_randomisation_takes_the_contrast_from_attribute_kwargs(bundled_model, images):
    given = torch.tensor([3, 5, 7, 9])
    log: list = []
    curves = model_randomisation(
        lambda m: _Recording(m, log),
        bundled_model,
        images,
        layers=["classifier"],
        attribute_kwargs={"contrast": given},
    )
    assert [bool(torch.equal(contrast, given)) for contrast, _ in log] == [True, True]
    expected = _contrastive_saliency_by_hand(bundled_model, images, given)
    torch.testing.assert_close(curves.original, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"`target` and `attribute_kwargs\['contrast'\]`"):
        model_randomisation(
            lambda m: Contrastive(Saliency, m),
            bundled_model,
            images,
            target=0,
            attribute_kwargs={"contrast": given},
        )
    with pytest.raises(ValueError, match=r"attribute_kwargs\['contrast'\].*one class"):
        model_randomisation(
            lambda m: Contrastive(Saliency, m),
            bundled_model,
            images,
            attribute_kwargs={"contrast": "all"},
        )


def test_randomisation_runs_contrast_cam(bundled_model, bundled_cam_layer, images):
    with torch.no_grad():
        trained_runner_up = _runner_up_by_hand(bundled_model(images))
    curves = model_randomisation(
        lambda m: ContrastCAM(m, bundled_cam_layer),
        bundled_model,
        images,
        layers=["classifier"],
    )
    cam = ContrastCAM(bundled_model, bundled_cam_layer)
    expected = cam.attribute(images, contrast=trained_runner_up, upsample_to_input=True)
    torch.testing.assert_close(curves.original, expected.double(), rtol=1e-5, atol=1e-6)


def test_class_sensitivity_hands_both_classes_to_contrast(bundled_model, images):
    result = class_sensitivity(lambda m: Contrastive(Saliency, m), bundled_model, images)
    with torch.no_grad():
        logits = bundled_model(images)
    predicted, runner_up = logits.argmax(dim=1), _runner_up_by_hand(logits)
    assert torch.equal(result.target, predicted) and torch.equal(result.contrast, runner_up)
    # one call on the inputs stacked twice, as for any explainer
    stacked = torch.cat([images, images])
    both = _contrastive_saliency_by_hand(bundled_model, stacked, torch.cat([predicted, runner_up]))
    n = len(images)
    torch.testing.assert_close(result.target_maps, both[:n], rtol=0, atol=0)
    torch.testing.assert_close(result.contrast_maps, both[n:], rtol=0, atol=0)
    torch.testing.assert_close(
        result.similarity["spearman_abs"], spearman_similarity(both[:n], both[n:])
    )
    cams = class_sensitivity(lambda m: ContrastCAM(m, "features.7"), bundled_model, images)
    assert torch.equal(cams.contrast, runner_up)
    with pytest.raises(ValueError, match="`attribute_kwargs` sets 'contrast'"):
        class_sensitivity(
            lambda m: ContrastCAM(m, "features.7"),
            bundled_model,
            images,
            attribute_kwargs={"contrast": runner_up},
        )
