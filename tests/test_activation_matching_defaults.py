"""ActivationMatchingMask on a fresh instance (the default amortised mode without a trained
mask net) and on models in train mode (BatchNorm running statistics come back unchanged,
also when ``forward_func`` is a plain function hiding the model)."""

from __future__ import annotations

import copy

import pytest
import torch
from _helpers import assert_model_unchanged, model_snapshot
from torch import nn
from torch.utils.data import TensorDataset

from captum_ext.attr import ActivationMatchingMask
from captum_ext.bundled import load_bundled_mask_explainer, load_bundled_model
from captum_ext.data import load_sample_digits

pytestmark = pytest.mark.usefixtures("one_thread")


def bn_model() -> nn.Sequential:
    """A small classifier with BatchNorm, in train mode, with non-trivial running stats."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).double()
    model[1].running_mean.uniform_(-0.5, 0.5)
    model[1].running_var.uniform_(0.5, 2.0)
    return model.train()


def images(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


# --------------------------------------------------------------------------------------
# fresh instance


def test_fresh_instance_in_default_mode_names_every_remedy():
    model = load_bundled_model()
    x, _ = load_sample_digits()
    explainer = ActivationMatchingMask(model, ["features.1", "features.4"])
    before = model_snapshot(model)
    with pytest.raises(ValueError) as info:
        explainer.attribute(x[:2])
    message = str(info.value)
    assert "ActivationMatchingMask.attribute" in message
    for remedy in (
        "explainer.fit(",
        "explainer.load(path)",
        "mask_net=",
        "captum_ext.bundled.load_bundled_mask_explainer()",
        "mode='per_image'",
    ):
        assert remedy in message, remedy
    assert_model_unchanged(model, before)
    # the same refusal with the mode spelled out, and with return_details
    with pytest.raises(ValueError, match="explainer.fit"):
        explainer.attribute(x[:2], mode="amortised", return_details=True)


def test_the_remedies_named_in_the_message_work():
    x, _ = load_sample_digits()
    # (4) the bundled explainer
    masks = load_bundled_mask_explainer().attribute(x[:3])
    assert masks.shape == (3, 1, 28, 28)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    # (5) per-image on the fresh instance
    fresh = ActivationMatchingMask(load_bundled_model(), ["features.1"])
    masks = fresh.attribute(x[:1], mode="per_image", steps=2, progress=False)
    assert masks.shape == (1, 1, 28, 28)
    # (3) a mask net given at construction is used as it is
    net = nn.Conv2d(1, 1, 1)
    given = ActivationMatchingMask(load_bundled_model(), ["features.1"], mask_net=net)
    with torch.no_grad():
        expected = (torch.sigmoid(net(x[:2])) > 0.5).to(x.dtype)
    torch.testing.assert_close(given.attribute(x[:2]), expected, rtol=0, atol=0)


# --------------------------------------------------------------------------------------
# train-mode models keep their BatchNorm statistics


def _forward_funcs(model):
    return {
        "module": model,
        "bound method": model.forward,
        "plain function": lambda t: model(t),
    }


@pytest.mark.parametrize("kind", ["module", "bound method", "plain function"])
@pytest.mark.parametrize("call", ["per_image", "fit", "amortised"])
def test_train_mode_model_keeps_its_batchnorm_statistics(kind, call):
    model = bn_model()
    x = images()
    net = nn.Conv2d(1, 1, 3, padding=1).double() if call == "amortised" else None
    explainer = ActivationMatchingMask(_forward_funcs(model)[kind], [model[2]], mask_net=net)
    before = model_snapshot(model)
    running_mean = model[1].running_mean
    if call == "per_image":
        explainer.attribute(x, mode="per_image", steps=2, progress=False, return_details=True)
    elif call == "fit":
        explainer.fit(TensorDataset(x), batch_size=3, progress=False)
    else:
        explainer.attribute(x, return_details=True)
    assert_model_unchanged(model, before)
    assert model[1].running_mean is running_mean  # restored in place
    assert model.training and model[1].training


def test_train_mode_model_keeps_its_statistics_when_the_call_raises():
    model = bn_model()
    explainer = ActivationMatchingMask(lambda t: model(t), [model[2]])
    before = model_snapshot(model)
    with pytest.raises(ValueError, match="target"):
        explainer.attribute(images(), mode="per_image", target=7, steps=1, progress=False)
    assert_model_unchanged(model, before)


def test_a_batchnorm_mask_net_still_trains_its_own_statistics():
    """Only the classifier's buffers are put back: the mask net's are its training."""
    model = bn_model().eval()
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Conv2d(2, 1, 1))
    net = net.double()
    explainer = ActivationMatchingMask(lambda t: model(t), [model[2]], mask_net=net)
    explainer.fit(TensorDataset(images()), batch_size=3, progress=False)
    assert int(net[1].num_batches_tracked) == 1
    assert not torch.equal(net[1].running_mean, torch.zeros(2, dtype=torch.float64))


def test_restarts_on_a_train_mode_model_judge_each_image_as_its_fit_did():
    """With ``batch_size=1`` (the setting for train-mode batch norm) a restart is decided per
    image, as the fit judged it: the images refitted are exactly those whose first mask,
    shown to the model alone, is empty or changes the class; the model comes back as it was."""
    model = bn_model()
    x = images(8)
    weights = {"act": 0.0, "ce": 1.0, "kl": 0.0, "area": 0.05, "bin": 0.0, "tv": 0.0, "rob": 0.0}
    explainer = ActivationMatchingMask(model, [model[2]], weights=weights)
    kwargs = dict(mode="per_image", steps=4, lr=0.05, batch_size=1, seed=1, keep="last")
    kwargs.update(progress=False, return_details=True)
    before = model_snapshot(model)
    first = explainer.attribute(x, restarts=0, **kwargs)
    again = explainer.attribute(x, restarts=2, **kwargs)
    assert_model_unchanged(model, before)
    judge = copy.deepcopy(model)  # train mode: judging updates its running statistics
    with torch.no_grad():
        shown = first.mask * x
        alone = torch.cat([judge(shown[i : i + 1]).argmax(1) for i in range(8)])
    failed = ~((alone == first.target) & first.mask.flatten(1).any(1))
    assert failed.any() and not failed.all()  # the test has teeth
    assert torch.equal(again.fits > 1, failed)
    assert torch.equal(again.mask[~failed], first.mask[~failed])


def test_a_seed_gives_the_same_masks_under_another_default_dtype():
    """The mask net was built in torch's default dtype and initialised from the seed there:
    under `torch.set_default_dtype(torch.float64)` (common in scientific code) the same
    seed gave another net and other masks (39 % against 49 % of the pixels kept)."""
    model = load_bundled_model()
    images = load_sample_digits()[0][:2]

    def masks():
        explainer = ActivationMatchingMask(model, ["features.7"])
        return explainer.attribute(images, mode="per_image", steps=5, seed=0, progress=False)

    expected = masks()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = masks()
    finally:
        torch.set_default_dtype(default)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
