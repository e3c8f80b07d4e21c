"""ROAD imputation (against a scipy sparse solve), ROAD curves and completeness."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_model_unchanged, model_snapshot

from captum_ext.metrics.road import completeness, road, road_imputation
from captum_ext.testing import dominant_colour_oracle


def _scipy_imputation(image: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """The linear-imputation system built pixel by pixel and solved by scipy."""
    sparse = pytest.importorskip("scipy.sparse")
    linalg = pytest.importorskip("scipy.sparse.linalg")
    c, h, w = image.shape
    index = {p: i for i, p in enumerate(zip(*np.nonzero(removed)))}
    a = sparse.lil_matrix((len(index), len(index)))
    b = np.zeros((len(index), c))
    for (r, q), i in index.items():
        for dr in (-1, 0, 1):
            for dq in (-1, 0, 1):
                rr, qq = r + dr, q + dq
                if (dr, dq) == (0, 0) or not (0 <= rr < h and 0 <= qq < w):
                    continue
                weight = 1 / 6 if dr == 0 or dq == 0 else 1 / 12
                a[i, i] += weight
                if (rr, qq) in index:
                    a[i, index[(rr, qq)]] -= weight
                else:
                    b[i] += weight * image[:, rr, qq]
    solution = linalg.spsolve(a.tocsr(), b).reshape(len(index), c)
    out = image.copy()
    for (r, q), i in index.items():
        out[:, r, q] = solution[i]
    return out


@pytest.mark.parametrize("batch", [1, 4, 5])
def test_batched_imputation_matches_scipy(batch):
    generator = torch.Generator().manual_seed(batch)
    images = torch.rand(batch, 3, 16, 20, generator=generator, dtype=torch.float64)
    removed = torch.rand(batch, 16, 20, generator=generator) < 0.5
    removed[0, :8, :10] = True  # one large hole
    ours = road_imputation(images, removed, noise=0.0)
    for i in range(batch):
        expected = _scipy_imputation(images[i].numpy(), removed[i].numpy())
        np.testing.assert_allclose(ours[i].numpy(), expected, atol=1e-5)
    kept = ~removed[:, None].expand_as(images)
    assert torch.equal(ours[kept], images[kept])


def test_float32_imputation_within_1e4_and_noise_only_on_removed_pixels():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 1, 24, 24, generator=generator, dtype=torch.float64)
    removed = torch.rand(2, 24, 24, generator=generator) < 0.7
    exact = road_imputation(images, removed, noise=0.0)
    single = road_imputation(images.float(), removed, noise=0.0)
    assert single.dtype == torch.float32
    assert float((single.double() - exact).abs().max()) < 1e-4
    noisy = road_imputation(images, removed, noise=0.01, generator=torch.Generator().manual_seed(1))
    difference = (noisy - exact)[:, 0]
    assert float(difference[~removed].abs().max()) == 0.0
    assert 0.005 < float(difference[removed].std()) < 0.02


def test_imputation_errors_name_the_argument():
    images = torch.rand(1, 1, 4, 4)
    with pytest.raises(ValueError, match="removed"):
        road_imputation(images, torch.ones(1, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="removed"):
        road_imputation(images, torch.ones(2, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="noise"):
        road_imputation(images, torch.zeros(1, 4, 4, dtype=torch.bool), noise=-1.0)


@pytest.fixture(scope="module")
def oracle():
    return dominant_colour_oracle(8, colours=3, size=12, seed=3)


def _softmax_model(oracle):
    """The colour counter with logits scaled down so probabilities are not saturated."""

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = oracle.model

        def forward(self, x):
            return self.inner(x) / 10.0

    return Scaled().eval()


def test_ground_truth_beats_a_random_map_on_road_and_completeness(oracle):
    model = _softmax_model(oracle)
    before = model_snapshot(model)
    truth = oracle.ground_truth
    noise = torch.rand(truth.shape, generator=torch.Generator().manual_seed(0))
    morf_truth = road(model, oracle.inputs, truth, target=oracle.target)
    morf_random = road(model, oracle.inputs, noise, target=oracle.target)
    assert morf_truth.probability.shape == (8, 9)
    assert morf_truth.probability.mean() < morf_random.probability.mean()
    lerf_truth = road(model, oracle.inputs, truth, target=oracle.target, order="lerf")
    assert lerf_truth.probability.mean() > morf_truth.probability.mean()
    done_truth = completeness(model, oracle.inputs, truth, target=oracle.target)
    done_random = completeness(model, oracle.inputs, noise, target=oracle.target)
    assert done_truth.drop.mean() > done_random.drop.mean()
    assert_model_unchanged(model, before)


def test_completeness_removes_by_value_and_mean_imputer_matches_its_definition(oracle):
    model = _softmax_model(oracle)
    maps = torch.arange(144.0).view(1, 1, 12, 12).expand(8, 1, 12, 12)
    curves = completeness(
        model, oracle.inputs, maps, target=oracle.target, thresholds=[0.5], imputer="mean"
    )
    removed = maps[:, 0] > 0.5 * 143.0
    assert torch.allclose(curves.removed_fraction[:, 0], removed.flatten(1).double().mean(1))
    mean = oracle.inputs.mean(dim=(2, 3), keepdim=True)
    filled = torch.where(removed[:, None], mean, oracle.inputs)
    with torch.no_grad():
        expected = (model(oracle.inputs).softmax(1) - model(filled).softmax(1)).gather(
            1, oracle.target[:, None]
        )[:, 0]
    torch.testing.assert_close(curves.drop[:, 0].float(), expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="imputer"):
        completeness(model, oracle.inputs, maps, imputer="zeros")
    with pytest.raises(ValueError, match="order"):
        road(model, oracle.inputs, maps, order="random")
