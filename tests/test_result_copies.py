"""Results and accumulated states are tensors of their own: editing what a method returns
never edits the caller's `target`, and editing what an accumulator's `update()` returns (or
refilling the buffer the caller passed) never edits what it accumulated."""

from __future__ import annotations

import copy

import pytest
import torch

from captum_ext.attr import VOICE, GradCAM, PathwayGradient
from captum_ext.metrics import ROAD, DeletionAUC, EnergyPointingGame, class_sensitivity

pytestmark = pytest.mark.usefixtures("one_thread")


def _results(model, layer, x, target):
    return {
        "VOICE": VOICE(GradCAM(model, layer)).attribute(x, target=target),
        "PathwayGradient": PathwayGradient(model).attribute(x, target=target, return_pathway=True),
        "class_sensitivity": class_sensitivity(
            lambda m: GradCAM(m, layer),
            model,
            x,
            target=target,
            attribute_kwargs={"upsample_to_input": True},
        ),
    }


@pytest.mark.parametrize("form", ["per_example", "single"])
def test_a_results_target_is_not_a_view_of_the_callers(
    bundled_model, bundled_digits, bundled_cam_layer, form
):
    """`result.target` shared memory with the caller's labels: `r.target[0] = 9` changed
    them, and a 0-dim target came back as a stride-0 view, every row one element."""
    x = bundled_digits[0][:4]
    target = bundled_digits[1][:4].clone() if form == "per_example" else torch.tensor(3)
    kept = target.clone()
    for name, result in _results(bundled_model, bundled_cam_layer, x, target).items():
        returned = result.target
        assert returned.untyped_storage().data_ptr() != target.untyped_storage().data_ptr(), name
        returned[0] = 9
        assert torch.equal(target, kept), name
        assert int(returned[1]) == int(kept.reshape(-1)[-1 if form == "single" else 1]), name


def test_editing_what_update_returns_leaves_the_accumulated_values(bundled_model, bundled_digits):
    """`ROAD.update` and `EnergyPointingGame.update` returned the stored tensor itself (and
    `DeletionAUC.update` on a float64 model): zeroing it made compute() 0."""
    x, y = bundled_digits[0][:3], bundled_digits[1][:3]
    maps = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    double = copy.deepcopy(bundled_model).double()
    for metric, arguments in (
        (ROAD(bundled_model, percentages=(0.2, 0.5)), (x, maps)),
        (DeletionAUC(double, n_steps=4), (x.double(), maps.double())),
    ):
        returned = metric.update(*arguments, target=y)
        before = metric.compute()
        returned.mul_(0)
        assert metric.compute() == before != 0
    objects = torch.zeros(3, 28, 28, dtype=torch.bool)
    objects[:, 5:15, 5:15] = True
    for dtype in (torch.float32, torch.float64):
        game = EnergyPointingGame()
        returned = game.update(maps.to(dtype), objects)
        before = game.compute()
        returned.mul_(0)
        assert game.compute() == before != 0
