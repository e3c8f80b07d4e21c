"""Sanity checks and the wrapping advice with a model that takes further inputs.

- ``model_randomisation`` and ``class_sensitivity`` read their default classes (the
  model's prediction) with ``attribute_kwargs["additional_forward_args"]``; before, the
  forward pass ran on the images alone (a required metadata argument died with the model's
  TypeError, a default one explained other classes than the model predicts).
- ``class_sensitivity`` explains the inputs stacked twice (target, then contrast): the
  per-example additional arguments are stacked with them (before: a shape error).
- A tuple of inputs is refused with what the function does and where further inputs go.
- The advice to wrap a model with a tuple / dict output passes the additional arguments
  on: ``lambda *args: model(*args)[0]``, not ``lambda x: model(x)[0]``.
"""

import pytest
import torch
import torch.nn.functional as F
from captum.attr import Saliency
from torch import nn

from captum_ext.attr import GradCAM
from captum_ext.inversion.losses import perturbed_kl_ce
from captum_ext.metrics import class_sensitivity, deletion, model_randomisation

N, CLASSES = 6, 5


class MetaNet(nn.Module):
    """forward(image, meta=None): the metadata decides the prediction of most examples."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.head = nn.Linear(6, CLASSES)
        self.meta_head = nn.Linear(4, CLASSES)

    def forward(self, image, meta=None):
        if meta is None:
            meta = torch.zeros(image.shape[0], 4)
        a = F.relu(self.conv2(F.relu(self.conv1(image))))
        return self.head(a.mean((2, 3))) + 20 * self.meta_head(meta)


class RequiresMeta(MetaNet):
    def forward(self, image, meta):
        return super().forward(image, meta)


class ReadsDict(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net
        self.conv2 = net.conv2

    def forward(self, image, container):
        return self.net(image, container["meta"])


def gradcam(model):
    return GradCAM(model, model.conv2)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    net = MetaNet().eval()
    generator = torch.Generator().manual_seed(4)
    image = torch.randn(N, 3, 8, 8, generator=generator)
    meta = torch.randn(N, 4, generator=generator)
    with torch.no_grad():
        predicted = net(image, meta).argmax(1)
        # the test means something only where the metadata changes the prediction
        assert bool((predicted != net(image).argmax(1)).any())
    return net, image, meta, predicted


def test_model_randomisation_default_target_is_the_prediction_with_the_metadata(setup):
    net, image, meta, predicted = setup
    kwargs = {"attribute_kwargs": {"additional_forward_args": meta}, "layers": ["head"]}
    default = model_randomisation(gradcam, net, image, **kwargs)
    explicit = model_randomisation(gradcam, net, image, target=predicted, **kwargs)
    torch.testing.assert_close(default.original, explicit.original, rtol=0, atol=0)
    torch.testing.assert_close(default.randomised, explicit.randomised, rtol=0, atol=0)


def test_model_randomisation_runs_a_model_that_requires_its_metadata(setup):
    net, image, meta, _ = setup
    model = RequiresMeta().eval()
    model.load_state_dict(net.state_dict())
    result = model_randomisation(
        lambda m: Saliency(m),
        model,
        image,
        attribute_kwargs={"additional_forward_args": meta},
        layers=["head", "conv2"],
    )
    assert result.randomised.shape == (2, N, 1, 8, 8)


def test_class_sensitivity_default_target_is_the_prediction_with_the_metadata(setup):
    net, image, meta, predicted = setup
    kwargs = {"attribute_kwargs": {"additional_forward_args": meta}}
    default = class_sensitivity(gradcam, net, image, **kwargs)
    explicit = class_sensitivity(gradcam, net, image, target=predicted, **kwargs)
    assert torch.equal(default.target, predicted)
    torch.testing.assert_close(default.target_maps, explicit.target_maps, rtol=0, atol=0)


@pytest.mark.parametrize("container", ["tensor", "dict"])
def test_class_sensitivity_stacks_the_metadata_with_the_inputs(setup, container):
    """2N rows (target, then contrast): each example's metadata for both of its rows; the
    result equals a loop over the examples."""
    net, image, meta, _ = setup
    model = RequiresMeta().eval()
    model.load_state_dict(net.state_dict())
    if container == "dict":
        model = ReadsDict(model).eval()

    def extra(rows):
        return {"meta": meta[rows]} if container == "dict" else meta[rows]

    def run(rows):
        return class_sensitivity(
            gradcam, model, image[rows], attribute_kwargs={"additional_forward_args": extra(rows)}
        )

    batch = run(slice(None))
    loop = [run(slice(i, i + 1)) for i in range(N)]
    assert torch.equal(batch.target, torch.cat([r.target for r in loop]))
    assert torch.equal(batch.contrast, torch.cat([r.contrast for r in loop]))
    for field in ("target_maps", "contrast_maps"):
        expected = torch.cat([getattr(r, field) for r in loop])
        torch.testing.assert_close(getattr(batch, field), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("check", [model_randomisation, class_sensitivity])
def test_a_tuple_of_inputs_says_where_the_other_inputs_go(setup, check):
    net, image, meta, _ = setup
    with pytest.raises(ValueError, match=r"`inputs` is a tuple of 2 tensors") as info:
        check(gradcam, net, (image, meta))
    message = str(info.value)
    assert "perturb" not in message  # neither check perturbs anything
    assert check.__name__ in message
    assert "attribute_kwargs={'additional_forward_args': ...}" in message


def test_the_metrics_refusal_of_a_tuple_names_additional_forward_args(setup):
    net, image, meta, _ = setup
    with pytest.raises(ValueError, match=r"perturb one batch.*as `additional_forward_args`"):
        deletion(net, (image, meta), torch.rand(N, 1, 8, 8), target=0)


class TupleOutput(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, *args):
        return self.net(*args), torch.zeros(1)


def test_wrapping_advice_passes_the_additional_arguments_on(setup):
    net, image, meta, _ = setup
    model = TupleOutput(net).eval()
    maps = torch.rand(N, 1, 8, 8)
    with pytest.raises(ValueError, match=r"forward_func=lambda \*args: model\(\*args\)\[0\]"):
        deletion(model, image, maps, target=0, additional_forward_args=meta)
    # the remedy works with the additional arguments
    scores = deletion(
        lambda *args: model(*args)[0], image, maps, target=0, additional_forward_args=meta
    )
    expected = deletion(net, image, maps, target=0, additional_forward_args=meta)
    torch.testing.assert_close(scores, expected)


def test_dict_output_advice_passes_the_additional_arguments_on(setup):
    net, image, meta, _ = setup

    def as_dict(*args):
        return {"out": net(*args)[:, :, None, None].expand(-1, -1, 2, 2)}

    with pytest.raises(ValueError, match=r"lambda \*args: model\(\*args\)\['out'\]\.mean"):
        deletion(as_dict, image, torch.rand(N, 1, 8, 8), target=0, additional_forward_args=meta)


def test_inversion_loss_advice_passes_the_additional_arguments_on():
    model = TupleOutput(MetaNet().eval()).eval()
    pixels = torch.rand(2, 3, 8, 8)
    conditioning = torch.softmax(torch.randn(2, CLASSES), 1)
    with pytest.raises(ValueError, match=r"pass lambda \*args: model\(\*args\)\[0\]"):
        perturbed_kl_ce(model, pixels, conditioning)
