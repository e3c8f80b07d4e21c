"""FinerCAM with many classes: only the explained classes' comparison sets are computed.

Before: ``FinerCAM.attribute`` scored every class (``finer_scores``), finding the comparison
set of each of the C classes (N x C x C distances) although the backward pass reads only the
explained class's score: about 11 s per image at 21,841 classes where GradCAM takes 0.02 s.
Now the score computes the sets of the classes ``target`` explains (N x C' x C); the maps are
those of the all-classes score, ties between class distances, ``comparison_positions``,
``alpha`` and every target form included.
"""

from __future__ import annotations

import pytest
import torch
from _helpers import assert_model_unchanged, finer_scores_by_full_orderings, model_snapshot
from torch import nn

import captum_ext.attr.finer_cam as finer_module
from captum_ext.attr import FinerCAM
from captum_ext.attr.finer_cam import finer_scores

torch.set_num_threads(1)


class TiedNet(nn.Module):
    """A small CNN whose C outputs copy ``distinct`` logits (``index``): exact ties at
    distance 0 between copies, and equal distances from every class to a class's copies."""

    def __init__(self, classes: int, distinct: int, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, distinct)
        # the same index order a randperm gives, so that copies are not neighbours by index
        index = torch.randperm(classes, generator=torch.Generator().manual_seed(seed)) % distinct
        self.register_buffer("index", index)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))[:, self.index]


def _grad_cam_of(model, x, score_rows):
    """Grad-CAM by hand, in the model's dtype: for each column of the (N, C') tensor that
    ``score_rows(logits)`` returns, the ReLU of the activations weighted by the spatial mean
    of that column's gradient at ``model.features[2]`` (one backward pass per column)."""
    captured = {}
    handle = model.features[2].register_forward_hook(lambda m, i, o: captured.update(a=o))
    try:
        logits = model(x)
    finally:
        handle.remove()
    scores = score_rows(logits)
    maps = []
    for column in range(scores.shape[1]):
        (gradient,) = torch.autograd.grad(scores[:, column].sum(), captured["a"], retain_graph=True)
        weights = gradient.mean(dim=(2, 3), keepdim=True)
        maps.append(torch.relu((weights * captured["a"]).sum(dim=1)).detach())
    return torch.stack(maps, dim=1)  # (N, C', h, w)


def test_only_the_explained_classes_comparison_sets_are_computed(monkeypatch):
    """The work, counted as rows of comparison sets: one per explained class (it was every
    class, C per example)."""
    rows = []
    original = finer_module.comparison_sets

    def counting(*args, **kwargs):
        result = original(*args, **kwargs)
        rows.append(result.shape[0] * result.shape[1])
        return result

    monkeypatch.setattr(finer_module, "comparison_sets", counting)
    model = TiedNet(classes=300, distinct=200).double().eval()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    cam = FinerCAM(model, "features.2")
    for target, explained in ((None, 3), (7, 3), ([1, 2, -1], 3), (torch.tensor([[4, 5]]), 6)):
        rows.clear()
        cam.attribute(x, target=target)
        assert rows == [explained], (target, rows)


@pytest.mark.parametrize("chunk", [1, 7, 2**22])
def test_scores_of_the_explained_classes_equal_every_class_scores(monkeypatch, chunk):
    """``finer_scores(..., classes=)`` gives, to the bit, the all-classes scores (and the
    full orderings' ones) in the columns asked for, ties, NaN / infinite logits and repeated
    classes included; NaN elsewhere; the same gradients."""
    monkeypatch.setattr(finer_module, "_CHUNK_ELEMENTS", chunk)
    generator = torch.Generator().manual_seed(0)
    for trial in range(60):
        n, classes = 1 + trial % 3, 2 + (7 * trial) % 30
        if trial % 2:  # integer logits: many exact ties, at distance 0 and on both sides
            logits = torch.randint(0, 4, (n, classes), generator=generator).double()
        else:
            logits = torch.randn(n, classes, generator=generator, dtype=torch.float64)
        if trial % 5 == 0:
            logits[0, trial % classes] = float("nan") if trial % 10 else float("inf")
        positions = [p for p in (1, 2, 3, 5) if p < classes][: 1 + trial % 3]
        width = 1 + trial % 4  # classes per example, repeats possible
        explained = torch.randint(0, classes, (n, width), generator=generator)
        ours = logits.clone().requires_grad_()
        every = logits.clone().requires_grad_()
        full = logits.clone().requires_grad_()
        got = finer_scores(ours, 0.7, positions, classes=explained)
        expected = finer_scores(every, 0.7, positions)
        by_full_orderings = finer_scores_by_full_orderings(full, 0.7, positions)
        picked = got.gather(1, explained)
        torch.testing.assert_close(
            picked, expected.gather(1, explained), rtol=0, atol=0, equal_nan=True
        )
        torch.testing.assert_close(
            picked, by_full_orderings.gather(1, explained), rtol=0, atol=0, equal_nan=True
        )
        asked = torch.zeros(n, classes, dtype=torch.bool).scatter_(1, explained, True)
        assert got[~asked].isnan().all(), trial
        weights = torch.randn(n, width, generator=generator, dtype=torch.float64)
        (picked * weights).sum().backward()
        (expected.gather(1, explained) * weights).sum().backward()
        (by_full_orderings.gather(1, explained) * weights).sum().backward()
        torch.testing.assert_close(ours.grad, every.grad, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(ours.grad, full.grad, rtol=1e-12, atol=1e-14, equal_nan=True)


TARGETS = [
    None,
    3,
    -1,
    [0, 5, 11],
    torch.tensor([[2], [2], [9]]),
    torch.tensor([[1, 4, 1], [0, 2, 3], [7, 7, 6]]),  # several per example, repeats
    "all",
]


@pytest.mark.parametrize("positions", [None, (2, 5), (1,), (4, 1, 3)])
@pytest.mark.parametrize("target", TARGETS, ids=[repr(t)[:24] for t in TARGETS])
def test_maps_are_grad_cam_of_the_all_classes_score(target, positions):
    """Against today's (all classes) score, computed explicitly in float64 by the full
    orderings, on a model with tied logits (copied classes)."""
    model = TiedNet(classes=12, distinct=7).double().eval()
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    before = model_snapshot(model)
    cam = FinerCAM(model, "features.2", alpha=0.8, comparison_positions=positions)
    got = cam.attribute(x, target=target)
    assert_model_unchanged(model, before)
    used = positions or (1, 2, 3)
    with torch.no_grad():
        logits = model(x)
    assert (logits[:, :, None] == logits[:, None, :]).sum() > 3 * 12  # ties at distance 0
    if target is None:
        columns = logits.argmax(dim=1, keepdim=True)
    elif target == "all":
        columns = torch.arange(12).expand(3, 12)
    else:
        columns = (
            torch.as_tensor(target).reshape(-1, 1)
            if not isinstance(target, torch.Tensor)
            else target
        )
        columns = (columns % 12).expand(3, -1)
    expected = _grad_cam_of(
        model, x, lambda z: finer_scores_by_full_orderings(z, 0.8, used).gather(1, columns)
    )
    if not (isinstance(target, torch.Tensor) and target.shape[1] > 1 or target == "all"):
        expected = expected[:, :1]  # one class per example: (N, 1, h, w)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_21841_classes_against_the_formula_by_hand():
    """The 21,841 classes of ImageNet-21k (ties between copied classes): the map of each
    example's predicted class and of a chosen class is Grad-CAM of s_P written out in float64
    from one ordering of all C classes by |y_j - y_P| (P first, ties in class order)."""
    model = TiedNet(classes=21841, distinct=15000).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    positions = (1, 2, 3, 7)

    def score(z, p):
        distance = (z - z.gather(1, p)).abs().scatter(1, p, -1.0)
        compared = distance.detach().argsort(dim=1, stable=True)[:, list(positions)]
        weights = z.softmax(dim=1).gather(1, compared)
        numerator = (weights * (z.gather(1, p) - 0.5 * z.gather(1, compared))).sum(1)
        return (numerator / (weights.sum(1) + 1e-9))[:, None]

    with torch.no_grad():
        predicted = model(x).argmax(dim=1, keepdim=True)
    chosen = predicted.flip(0)  # one example's class for the other
    cam = FinerCAM(model, "features.2", alpha=0.5, comparison_positions=positions)
    for target, p in ((None, predicted), (chosen.flatten(), chosen)):
        got = cam.attribute(x, target=target)
        expected = _grad_cam_of(model, x, lambda z, p=p: score(z, p))
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_the_score_read_outside_attribute_scores_every_class():
    """VOICE reads ``FinerCAM._score`` outside ``attribute``: it scores every class, also
    after an ``attribute`` call that raised."""
    model = TiedNet(classes=9, distinct=6).double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    cam = FinerCAM(model, "features.2")
    with pytest.raises(ValueError, match="target"):
        cam.attribute(x, target=12)
    cam.attribute(x, target=1)
    with torch.no_grad():
        logits = model(x)
    torch.testing.assert_close(
        cam._score(logits), finer_scores_by_full_orderings(logits, 1.0, (1, 2, 3)), rtol=0, atol=0
    )
