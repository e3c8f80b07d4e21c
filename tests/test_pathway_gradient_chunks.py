"""PathwayGradient(score="integrated") in passes of `internal_batch_size` rows: the same
scores, masks and attributions as the float64 reference whatever the pass size, the automatic
size bounded by the module outputs measured on the first pass, extra per-example arguments
split with the rows, and the argument checked."""

from __future__ import annotations

import copy

import pytest
import torch
from test_pathway_gradient import reference_pathway
from torch import nn

import captum_ext.attr.pathway_gradient as pathway_module
from captum_ext.attr import PathwayGradient


@pytest.fixture(scope="module")
def digits64(bundled_model, bundled_digits):
    images, labels = bundled_digits
    return copy.deepcopy(bundled_model).double().eval(), images[:5].double(), labels[:5]


class _CountingRows(nn.Module):
    """The model, recording the rows of every forward pass."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.rows = model, []

    def forward(self, x, scale=None):
        self.rows.append(x.shape[0])
        out = self.model(x)
        return out if scale is None else out * scale[:, None]


@pytest.mark.parametrize("rows", [1, 3, 5, 7, 24, 1000])
def test_every_pass_size_gives_the_reference(digits64, rows):
    model, x, y = digits64
    result = PathwayGradient(model).attribute(
        x,
        target=y,
        sparsity=0.9,
        score="integrated",
        n_steps=5,
        internal_batch_size=rows,
        return_pathway=True,
    )
    expected, masks = reference_pathway(model, x, y, 0.9, score="integrated", n_steps=5)
    torch.testing.assert_close(result.attributions, expected, atol=1e-10, rtol=0)
    for i in range(x.shape[0]):
        for site, mask in zip(result.sites, masks[i]):
            assert torch.equal(result.masks[site][i], mask)


def test_passes_hold_at_most_the_rows_asked_for(digits64):
    model, x, y = digits64
    counting = _CountingRows(model)
    PathwayGradient(counting, multiply_by_inputs=False).attribute(
        x,
        target=y,
        score="integrated",
        n_steps=4,
        internal_batch_size=6,
        layers=["model.features.1"],
    )
    # the scoring pass, then 4 x 5 = 20 rows in passes of 6, then the pruned network
    assert counting.rows == [5, 6, 6, 6, 2, 5]


def test_the_automatic_pass_size_follows_the_measured_outputs(digits64, monkeypatch):
    model, x, y = digits64
    plain = PathwayGradient(model).attribute(x, target=y, score="integrated", n_steps=4)
    counting = _CountingRows(model)
    PathwayGradient(counting).attribute(
        x, target=y, score="integrated", n_steps=4, layers=["model.features.1"]
    )
    assert counting.rows == [5, 20, 5]  # 1 GiB holds every row of these small digits
    # a budget of about three rows' outputs and gradients: passes of three rows
    with pathway_module.counted_output_bytes() as counted:
        model(x[:1])
    per_row = counted.total
    monkeypatch.setattr(pathway_module, "_CHUNK_BYTES", 2 * per_row * 3 + per_row // 2)
    counting.rows.clear()
    small = PathwayGradient(counting).attribute(
        x, target=y, score="integrated", n_steps=4, layers=["model.features.1"]
    )
    assert counting.rows == [5, 3, 3, 3, 3, 3, 3, 2, 5]
    every_relu = PathwayGradient(model).attribute(x, target=y, score="integrated", n_steps=4)
    torch.testing.assert_close(every_relu, plain, atol=1e-12, rtol=0)
    assert small.shape == x.shape


def test_extra_per_example_arguments_follow_their_rows(digits64):
    model, x, y = digits64
    scale = torch.linspace(0.5, 2.0, x.shape[0], dtype=torch.float64)
    counting = _CountingRows(model)
    method = PathwayGradient(counting)
    whole = method.attribute(
        x,
        target=y,
        score="integrated",
        n_steps=3,
        additional_forward_args=(scale,),
        internal_batch_size=1000,
    )
    split = method.attribute(
        x,
        target=y,
        score="integrated",
        n_steps=3,
        additional_forward_args=(scale,),
        internal_batch_size=4,
    )
    torch.testing.assert_close(split, whole, atol=1e-12, rtol=0)
    one_by_one = torch.cat(
        [
            method.attribute(
                x[i : i + 1],
                target=int(y[i]),
                score="integrated",
                n_steps=3,
                additional_forward_args=(scale[i : i + 1],),
                internal_batch_size=2,
            )
            for i in range(x.shape[0])
        ]
    )
    torch.testing.assert_close(split, one_by_one, atol=1e-12, rtol=0)


@pytest.mark.parametrize("bad", [0, -3, 2.5, "4", True])
def test_a_bad_internal_batch_size_is_named(digits64, bad):
    model, x, y = digits64
    with pytest.raises((ValueError, TypeError), match="internal_batch_size"):
        PathwayGradient(model).attribute(x, target=y, score="integrated", internal_batch_size=bad)
