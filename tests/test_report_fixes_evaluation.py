"""The evaluation section ran Integrated Gradients' 16 steps of every image in one backward
pass (class_sensitivity stacks the batch twice: 128 ResNet-18 samples at 224 x 224, 4 GB);
it now passes ``internal_batch_size = min(batch_size, 16)``. Its help says it scores the
first 4 images."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import captum_ext.viz.evaluation as evaluation

torch.set_num_threads(1)


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).eval()


def forward_sizes(model: nn.Module) -> list[int]:
    """The batch size of every forward of ``model`` that records gradients (a backward)."""
    sizes: list[int] = []
    model.register_forward_hook(
        lambda module, args, output: (
            sizes.append(args[0].shape[0]) if torch.is_grad_enabled() else None
        )
    )
    return sizes


def test_integrated_gradients_passes_at_most_internal_batch_size_samples():
    model = small_net()
    images = torch.rand(4, 3, 8, 8)
    target = torch.tensor([0, 1, 2, 0])
    whole = evaluation._explainers(model, model[1], images, internal_batch_size=64)
    chunked = evaluation._explainers(model, model[1], images, internal_batch_size=5)
    sizes = forward_sizes(model)
    expected = whole["Integrated Gradients"](model).attribute(images, target)
    assert max(sizes) == 4 * 16  # 4 images x 16 steps in one pass
    sizes.clear()
    maps = chunked["Integrated Gradients"](model).attribute(images, target)
    assert max(sizes) <= 5
    torch.testing.assert_close(maps, expected)  # the same integral, in chunks


@pytest.mark.parametrize("batch_size, bound", [(2, 2), (64, 16)])
def test_compute_evaluation_bounds_the_internal_batch_by_batch_size(monkeypatch, batch_size, bound):
    seen = []
    original = evaluation._explainers

    def spy(*args, **kwargs):
        seen.append(kwargs.get("internal_batch_size"))
        return original(*args, **kwargs)

    monkeypatch.setattr(evaluation, "_explainers", spy)
    model = small_net()
    sizes = forward_sizes(model)
    evaluation.compute_evaluation(
        model, model[1], torch.rand(2, 3, 8, 8), batch_size=batch_size, deletion_steps=2
    )
    # class_sensitivity stacks the 2 images twice: 4 per pass; IG's 16 steps no more than
    # `bound` (it sent 2 x 2 x 16 = 64 before)
    assert max(sizes) <= max(bound, 4)
    assert seen == [bound]


def test_help_says_the_evaluation_section_scores_the_first_images(capsys):
    from captum_ext.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["report", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"on the first {evaluation.EVALUATION_IMAGES} images only" in text
    assert evaluation.EVALUATION_IMAGES == 4
