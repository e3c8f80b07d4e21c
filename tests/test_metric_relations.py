"""Relations the ranking and ROAD-style metrics must satisfy whatever the rounding or the
other arguments: a map's pixel order does not change with a positive rescaling or its dtype
(ties broken by pixel index, also after upsampling a CAM), and the score at one fraction of
``road`` / ``completeness`` / ``soundness`` does not depend on the other fractions asked for."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from captum.attr import LayerGradCam

from captum_ext.metrics import completeness, deletion_curves, insertion_curves, road, soundness
from captum_ext.metrics._perturbation import ranking_scores
from captum_ext.metrics.remove_and_debias import road_imputation

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# ranking of upsampled maps


def _exact_bilinear(values: list[list[Fraction]], size: int) -> list[Fraction]:
    """Bilinear upsampling (align_corners=False) of a square map in exact arithmetic,
    flattened row-major: the oracle, written from the formula, not the library."""
    old = len(values)

    def axis(i: int) -> tuple[int, int, Fraction]:
        position = max((Fraction(i) + Fraction(1, 2)) * Fraction(old, size) - Fraction(1, 2), 0)
        low = min(int(position), old - 1)
        high = min(low + 1, old - 1)
        return low, high, position - low

    out = []
    for r in range(size):
        r0, r1, tr = axis(r)
        for c in range(size):
            c0, c1, tc = axis(c)
            top = values[r0][c0] * (1 - tc) + values[r0][c1] * tc
            bottom = values[r1][c0] * (1 - tc) + values[r1][c1] * tc
            out.append(top * (1 - tr) + bottom * tr)
    return out


def _order(ranked: torch.Tensor) -> torch.Tensor:
    return torch.argsort(ranked.flatten(1), dim=1, descending=True, stable=True)


def test_upsampled_map_ranks_pixels_in_exact_order_ties_by_index():
    """Isolated peaks of a 7 x 7 map give pixels that are equal in exact arithmetic
    (weights 0.625 * 0.875 and 0.875 * 0.625); a float32 upsampling rounded them an ulp apart
    and ranked them by rounding, not by pixel index (the documented tie-break)."""
    generator = torch.Generator().manual_seed(3)
    maps = torch.zeros(4, 1, 7, 7)
    for i in range(4):  # three isolated peaks with full-mantissa float32 values per map
        for r, c in ((1, 1), (3, 5), (5, 2)):
            maps[i, 0, r, c] = torch.rand((), generator=generator) + 0.1
    x = torch.zeros(4, 1, 28, 28)
    expected = []
    for i in range(4):
        cells = [[Fraction(float(v)) for v in row] for row in maps[i, 0].tolist()]
        exact = _exact_bilinear(cells, 28)
        expected.append(sorted(range(28 * 28), key=lambda p: (-exact[p], p)))
    expected = torch.tensor(expected)
    assert _order(ranking_scores(maps, x, "sum_abs")).equal(expected)
    assert _order(ranking_scores(maps.double(), x, "sum_abs")).equal(expected)
    assert _order(ranking_scores(maps[:, 0], x, "sum_abs")).equal(expected)  # (N, h, w)


def test_deletion_and_insertion_of_a_cam_ignore_its_scale_and_dtype(
    bundled_model, bundled_digits, bundled_cam_layer
):
    """deletion(map), deletion(3.7 * map) and deletion(map.double()) differed (AUC by 3e-5,
    curves by 1.6e-3 on the bundled model's GradCAM maps): the ranking followed the float32
    rounding of the upsampled map."""
    images, labels = bundled_digits
    x, y = images[0:40:5].clone(), labels[0:40:5].clone()
    cam = LayerGradCam(bundled_model, bundled_model.get_submodule(bundled_cam_layer))
    maps = cam.attribute(x, target=y).detach()
    assert maps.shape[-2:] == (7, 7)
    orders = [_order(ranking_scores(m, x, "sum_abs")) for m in (maps, maps * 3.7, maps.double())]
    assert orders[0].equal(orders[1]) and orders[0].equal(orders[2])
    for curves in (deletion_curves, insertion_curves):
        base = curves(bundled_model, x, maps, target=y, n_steps=20)
        for other in (maps * 3.7, maps.double(), maps * 1e-3):
            result = curves(bundled_model, x, other, target=y, n_steps=20)
            assert torch.equal(result.curves, base.curves)
            assert torch.equal(result.auc, base.auc)


# ---------------------------------------------------------------------------------------------
# ROAD-style metrics: a fraction's noise does not depend on the other fractions


@pytest.fixture(scope="module")
def saliency(bundled_model, bundled_digits):
    images, labels = bundled_digits
    x, y = images[0:40:8].clone(), labels[0:40:8].clone()  # 5 digits
    maps = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    return x, y, maps


def test_road_at_a_fraction_does_not_depend_on_the_other_fractions(bundled_model, saliency):
    """The noise of each (example, fraction) row was seeded by the fraction's position in
    ``percentages``: road(percentages=[0.5]) differed from the 0.5 column of [0.2, 0.5, 0.8]
    by up to 0.01 in probability, and a reversed list did not give reversed columns."""
    x, y, maps = saliency
    full = road(bundled_model, x, maps, target=y, percentages=[0.2, 0.5, 0.8])
    alone = road(bundled_model, x, maps, target=y, percentages=[0.5])
    reverse = road(bundled_model, x, maps, target=y, percentages=[0.8, 0.5, 0.2])
    assert torch.equal(alone.probability[:, 0], full.probability[:, 1])
    assert torch.equal(reverse.probability, full.probability.flip(1))
    assert torch.equal(reverse.correct, full.correct.flip(1))
    for order in ("morf", "lerf"):  # the noise is real: another seed moves the scores
        a = road(bundled_model, x, maps, target=y, percentages=[0.5], order=order)
        b = road(bundled_model, x, maps, target=y, percentages=[0.5], order=order, seed=1)
        assert float((a.probability - b.probability).abs().max()) > 0


def test_road_row_is_the_noisy_imputation_of_its_own_mask(bundled_model, saliency):
    """An independent computation of one row: the 50% most relevant pixels removed, the
    noiseless ROAD imputation plus 0.01 standard normal noise on them, the noise from a
    generator seeded by the image and the mask (road_imputation's rule, with road's seed)."""
    from captum_ext._utils.seeding import combined_keys, content_keys

    x, y, maps = saliency
    seed = 7
    got = road(bundled_model, x, maps, target=y, percentages=[0.5], seed=seed).probability[:, 0]
    scores = maps.double().sum(dim=1).flatten(1)
    order = torch.argsort(-scores, dim=1, stable=True)
    removed = torch.zeros_like(scores, dtype=torch.bool)
    removed.scatter_(1, order[:, : round(0.5 * 28 * 28)], True)
    removed = removed.view(-1, 28, 28)
    filled = road_imputation(x, removed, noise=0.0)
    keys = combined_keys(content_keys(x, seed), content_keys(removed, seed))
    noise = torch.stack(
        [torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(k)) for k in keys]
    )
    imputed = filled + 0.01 * removed[:, None].float() * noise
    with torch.no_grad():
        expected = bundled_model(imputed).softmax(dim=1).gather(1, y[:, None])[:, 0]
    torch.testing.assert_close(got.float(), expected, atol=1e-6, rtol=0)


def test_completeness_and_soundness_at_a_step_do_not_depend_on_the_other_steps(
    bundled_model, saliency
):
    x, y, maps = saliency
    full = completeness(bundled_model, x, maps, target=y, thresholds=[0.3, 0.6])
    alone = completeness(bundled_model, x, maps, target=y, thresholds=[0.6])
    assert torch.equal(alone.drop[:, 0], full.drop[:, 1])
    reverse = completeness(bundled_model, x, maps, target=y, thresholds=[0.6, 0.3])
    assert torch.equal(reverse.drop, full.drop.flip(1))
    # soundness: the score measured at a removed fraction is the same in any schedule
    # (the soundness curve itself accumulates over the schedule, by design)
    long = soundness(bundled_model, x, maps, target=y, removed_fractions=[0.8, 0.5, 0.2])
    short = soundness(bundled_model, x, maps, target=y, removed_fractions=[0.5])
    assert torch.equal(short.score[:, 0], long.score[:, 1])
