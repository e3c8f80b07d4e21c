"""The pruning pass of ActivationMatchingMask (``attribute(prune=...)`` and ``prune``):
against a one-image, one-pixel-at-a-time reference written from the rule, its guarantees
(subset, class, confidence floor, 1-minimality, at least one pixel), both entry points
agreeing, the bundled model, and its argument checks."""

from __future__ import annotations

import pytest
import torch
from _helpers import assert_model_unchanged, model_snapshot
from torch import nn

from captum_ext.attr import ActivationMatchingMask
from captum_ext.attr._activation_matching_prune import CONFIDENCE_TOLERANCE
from captum_ext.bundled import load_bundled_mask_explainer
from captum_ext.data import load_sample_digits

pytestmark = pytest.mark.usefixtures("one_thread")

BASELINE = -0.5


class StoredLogits(nn.Module):
    """A 'mask net' that returns fixed mask logits for the first len(x) images."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, x):
        return self.logits[: x.shape[0]].to(x.dtype)


def classifier() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 4),
    ).double()


def setting(n: int = 6):
    model = classifier().eval()
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(n, 1, 8, 8, generator=generator, dtype=torch.float64)
    mask_logits = torch.randn(n, 1, 8, 8, generator=generator, dtype=torch.float64) + 1.0
    explainer = ActivationMatchingMask(
        model, ["0"], mask_net=StoredLogits(mask_logits), baseline=BASELINE
    )
    return model, x, explainer


def log_odds_one(model, image, y):
    z = model(image[None])[0]
    others = torch.cat([z[:y], z[y + 1 :]])
    return float(z[y] - torch.logsumexp(others, 0))


@torch.no_grad()
def reference_prune(model, x, probabilities, max_passes=None):
    """The rule, one image and one candidate pixel at a time, in plain loops."""
    out = []
    for image, p in zip(x, probabilities):
        y = int(model(image[None]).argmax())
        mask = (p > 0.5).double()
        explained = mask * image + (1 - mask) * BASELINE
        floor = min(log_odds_one(model, image, y), log_odds_one(model, explained, y))
        floor += CONFIDENCE_TOLERANCE
        passes = 0
        while max_passes is None or passes < max_passes:
            passes += 1
            kept = [int(i) for i in mask.flatten().nonzero()[:, 0]]
            kept.sort(key=lambda i: (float(p.flatten()[i]), i))
            dropped = 0
            for i in kept:
                if mask.sum() <= 1:
                    break
                trial = mask.clone().flatten()
                trial[i] = 0
                trial = trial.view_as(mask)
                e = trial * image + (1 - trial) * BASELINE
                if int(model(e[None]).argmax()) == y and log_odds_one(model, e, y) >= floor:
                    mask = trial
                    dropped += 1
            if dropped == 0:
                break
        out.append(mask)
    return torch.stack(out)


@pytest.mark.parametrize("max_passes", [1, 2, None])
def test_batched_pass_equals_the_one_by_one_reference(max_passes):
    model, x, explainer = setting()
    prune = True if max_passes is None else max_passes
    result = explainer.attribute(x, return_details=True, prune=prune, progress=False)
    expected = reference_prune(model, x, result.probabilities, max_passes)
    assert torch.equal(result.mask, expected)
    unpruned = (result.probabilities > 0.5).double()
    assert torch.equal(result.pruned, (unpruned - expected).flatten(1).sum(1).long())
    assert int(result.pruned.sum()) > 0  # the setting exercises the pass


def test_guarantees_subset_class_confidence_minimality_and_one_pixel():
    model, x, explainer = setting(8)
    before = explainer.attribute(x, return_details=True, progress=False)
    after = explainer.attribute(x, return_details=True, prune=True, progress=False)
    assert bool((after.mask <= before.mask).all())
    assert bool((after.mask.flatten(1).sum(1) >= 1).all())
    assert after.active_fraction.mean() < before.active_fraction.mean()
    with torch.no_grad():
        for i in range(len(x)):
            y = int(after.target[i])
            if not bool(before.agreement[i]):
                continue
            e = after.explanation[i]
            assert int(model(e[None]).argmax()) == y
            floor = min(log_odds_one(model, x[i], y), log_odds_one(model, before.explanation[i], y))
            assert log_odds_one(model, e, y) >= floor
            # 1-minimal: no single kept pixel can go
            kept = after.mask[i].flatten().nonzero()[:, 0]
            if len(kept) == 1:
                continue
            for pixel in kept:
                trial = after.mask[i].clone().flatten()
                trial[pixel] = 0
                trial = trial.view_as(after.mask[i])
                smaller = trial * x[i] + (1 - trial) * BASELINE
                still = (
                    int(model(smaller[None]).argmax()) == y
                    and log_odds_one(model, smaller, y) >= floor + CONFIDENCE_TOLERANCE
                )
                assert not still


def test_prune_method_equals_attribute_with_prune_and_leaves_the_model_alone():
    model, x, explainer = setting()
    snapshot = model_snapshot(model)
    result = explainer.attribute(x, return_details=True, progress=False, seed=4)
    pruned = explainer.prune(x, result, seed=4)
    direct = explainer.attribute(x, return_details=True, prune=True, progress=False, seed=4)
    assert_model_unchanged(model, snapshot)
    for name in ("mask", "explanation", "explanation_confidence", "sufficiency", "necessity"):
        assert torch.equal(getattr(pruned, name), getattr(direct, name)), name
    assert torch.equal(pruned.pruned, direct.pruned)
    assert torch.equal(pruned.probabilities, result.probabilities)
    # pruning a pruned result drops nothing more and counts on
    again = explainer.prune(x, pruned, seed=4)
    assert torch.equal(again.mask, pruned.mask)
    assert torch.equal(again.pruned, pruned.pruned)


def test_without_prune_nothing_changes():
    _, x, explainer = setting()
    result = explainer.attribute(x, return_details=True, progress=False)
    assert result.pruned is None
    assert torch.equal(result.mask, (result.probabilities > 0.5).double())


def test_bundled_mask_net_on_the_sample_digits():
    """The bundled (confident, trained) model and its mask net: the pass shrinks the masks
    and keeps every kept label and every 'at least as confident' digit."""
    explainer = load_bundled_mask_explainer()
    x, _ = load_sample_digits()
    before = explainer.attribute(x, return_details=True)
    after = explainer.prune(x, before)
    assert float(after.active_fraction.mean()) < 0.8 * float(before.active_fraction.mean())
    assert bool(after.agreement[before.agreement].all())
    confident = before.explanation_confidence >= before.confidence
    assert bool((after.explanation_confidence >= after.confidence)[confident].all())


@pytest.mark.parametrize("bad", [0, -2, 1.5, "yes", None])
def test_prune_argument_is_checked(bad):
    _, x, explainer = setting(2)
    with pytest.raises((ValueError, TypeError), match="`prune`"):
        explainer.attribute(x, prune=bad)


def test_prune_method_checks_its_arguments():
    _, x, explainer = setting(3)
    result = explainer.attribute(x, return_details=True, progress=False)
    with pytest.raises(TypeError, match="`result`"):
        explainer.prune(x, result.mask)
    with pytest.raises(ValueError, match="`result`"):
        explainer.prune(x[:2], result)
    with pytest.raises(ValueError, match="`max_passes`"):
        explainer.prune(x, result, max_passes=0)


def test_train_mode_model_comes_back_unchanged():
    """The pass runs the model on subsets of the batch; a train-mode model's batch-norm
    statistics, flags and gradients are put back afterwards."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 3),
    ).double()
    model[1].running_mean.uniform_(-0.5, 0.5)
    model[1].running_var.uniform_(0.5, 2.0)
    model.train()
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(4, 1, 8, 8, generator=generator, dtype=torch.float64)
    mask_logits = torch.randn(4, 1, 8, 8, generator=generator, dtype=torch.float64) + 1.0
    explainer = ActivationMatchingMask(model, ["0"], mask_net=StoredLogits(mask_logits))
    snapshot = model_snapshot(model)
    result = explainer.attribute(x, return_details=True, prune=True, progress=False)
    explainer.prune(x, result)
    assert_model_unchanged(model, snapshot)
    assert model.training
