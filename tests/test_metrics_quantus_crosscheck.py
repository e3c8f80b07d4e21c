"""Cross-checks of the evaluation metrics against Quantus 0.6 on the same inputs.

Quantus is in the ``dev`` extra, so these run in CI; ``importorskip`` is only the fallback
for an install without it. Each test states which parts of the two computations are the same
quantity and compares exactly those, on the bundled digit model (1 x 28 x 28 digits):

- ROAD: Quantus' ``noisy_linear_imputation`` builds the same 8-neighbour system (weights 1/6
  and 1/12, the kept pixels as the right-hand side) and solves it with scipy's ``spsolve``; with
  the noise set to 0 the imputed images must equal ours. Its noise is drawn from numpy's global
  generator, ours from a torch generator, so the noisy images are not comparable; the ROAD
  metric itself (per-percentage accuracy of the model on the imputed images) is compared with
  ``noise=0`` on maps without ties (Quantus' argsort is not stable).
- MPRT: Quantus re-initialises each layer with ``torch.manual_seed(seed + 1)`` (the same seed
  for every layer) and scores Spearman of the absolute, max-normalised maps; our independent
  randomisation of one layer with ``seed = quantus_seed + 1`` draws the same weights, so the
  per-example Spearman must agree layer by layer.
- Pointing game: a hit when a maximum of the map lies in the mask. Quantus counts any of tied
  maxima, ours the first in row-major order: equal on maps without ties.
- Region perturbation with ``patch_size=1`` is pixel deletion, most relevant first, with a
  constant baseline: its curve is ``p(x) - p(x after k pixels)``, our deletion curve's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _helpers import assert_model_unchanged, model_snapshot
from captum.attr import Saliency

from captum_ext.metrics.deletion_insertion import deletion_curves
from captum_ext.metrics.ground_truth import pointing_game
from captum_ext.metrics.remove_and_debias import road, road_imputation
from captum_ext.metrics.sanity import model_randomisation

quantus = pytest.importorskip("quantus")

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


def _untied_maps(n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=generator, dtype=torch.float64)


def test_road_imputation_equals_quantus_noisy_linear_imputation(bundled_digits):
    from quantus.functions.perturb_func import noisy_linear_imputation

    images, _ = bundled_digits
    images = images[:6].double()
    maps = _untied_maps(6, 0)
    fractions = (0.05, 0.3, 0.7, 0.98)
    for fraction in fractions:
        count = int(784 * fraction)
        order = maps.flatten(1).argsort(dim=1, descending=True)[:, :count]
        removed = torch.zeros(6, 784, dtype=torch.bool)
        removed.scatter_(1, order, True)
        ours_direct = road_imputation(images, removed.view(6, 28, 28), noise=0.0, solver="direct")
        ours_cg = road_imputation(
            images, removed.view(6, 28, 28), noise=0.0, solver="cg", tolerance=1e-10
        )
        theirs = np.stack(
            [
                noisy_linear_imputation(arr=images[i].numpy(), indices=order[i].numpy(), noise=0.0)
                for i in range(6)
            ]
        )
        ours_block = road_imputation(images, removed.view(6, 28, 28), noise=0.0, solver="block")
        np.testing.assert_allclose(ours_direct.numpy(), theirs, atol=1e-10, rtol=0)
        np.testing.assert_allclose(ours_block.numpy(), theirs, atol=1e-10, rtol=0)
        np.testing.assert_allclose(ours_cg.numpy(), theirs, atol=1e-6, rtol=0)
        ours_multigrid = road_imputation(
            images, removed.view(6, 28, 28), noise=0.0, solver="multigrid"
        )
        np.testing.assert_allclose(ours_multigrid.numpy(), theirs, atol=1e-6, rtol=0)


def test_road_accuracy_curve_equals_quantus_road(bundled_model, bundled_digits):
    images, labels = bundled_digits
    images, labels = images[:16], labels[:16]
    maps = _untied_maps(16, 1).float()
    before = model_snapshot(bundled_model)
    # 25 / 50 / 75 % of 784 pixels are whole numbers: Quantus truncates, we round
    percentages = [25, 50, 75]
    metric = quantus.ROAD(
        percentages=percentages,
        noise=0.0,
        abs=False,
        normalise=False,
        disable_warnings=True,
    )
    theirs = metric(
        model=bundled_model,
        x_batch=images.numpy(),
        y_batch=labels.numpy(),
        a_batch=maps.numpy(),
        device="cpu",
        channel_first=True,
        batch_size=16,
    )
    ours = road(
        bundled_model,
        images,
        maps,
        target=labels,
        percentages=[p / 100 for p in percentages],
        noise=0.0,
    )
    assert_model_unchanged(bundled_model, before)
    accuracy = ours.correct.mean(dim=0).numpy()
    np.testing.assert_allclose(accuracy, [theirs[p] for p in percentages], atol=1e-12)
    # the metric must move on this model, or the comparison shows nothing
    assert accuracy[0] > accuracy[-1]


def test_model_randomisation_equals_quantus_mprt(bundled_model, bundled_digits):
    images, labels = bundled_digits
    images, labels = images[:8], labels[:8]
    before = model_snapshot(bundled_model)

    def explain(model, inputs, targets, **kwargs):
        inputs = torch.as_tensor(inputs)
        targets = torch.as_tensor(targets)
        return Saliency(model).attribute(inputs, target=targets).detach().numpy()

    quantus_seed = 42
    metric = quantus.MPRT(
        layer_order="independent", seed=quantus_seed, abs=True, disable_warnings=True
    )
    theirs = metric(
        model=bundled_model,
        x_batch=images.numpy(),
        y_batch=labels.numpy(),
        a_batch=None,
        explain_func=explain,
        device="cpu",
        channel_first=True,
        batch_size=8,
    )
    layers = [name for name in theirs if name != "original"]
    assert layers == ["features.0", "features.3", "features.6", "classifier"]
    for name in layers:
        ours = model_randomisation(
            lambda m: Saliency(m),
            bundled_model,
            images,
            target=labels,
            cascade=False,
            layers=[name],
            similarity="spearman_abs",
            seed=quantus_seed + 1,
        )
        np.testing.assert_allclose(
            ours.similarity["spearman_abs"][0].numpy(), theirs[name], atol=1e-6
        )
    assert_model_unchanged(bundled_model, before)


def test_pointing_game_equals_quantus(bundled_digits):
    images, _ = bundled_digits
    maps = _untied_maps(12, 2)
    generator = torch.Generator().manual_seed(3)
    masks = torch.zeros(12, 1, 28, 28, dtype=torch.bool)
    for i in range(12):
        y0, x0 = torch.randint(0, 20, (2,), generator=generator).tolist()
        masks[i, 0, y0 : y0 + 9, x0 : x0 + 9] = True
    # half the examples get their maximum moved into the box: hits and misses both occur
    for i in range(0, 12, 2):
        inside = masks[i, 0].nonzero()[0]
        maps[i, 0, inside[0], inside[1]] = 2.0
    metric = quantus.PointingGame(abs=False, normalise=False, disable_warnings=True)
    theirs = metric(
        model=None,
        x_batch=images[:12].numpy(),
        y_batch=np.zeros(12, dtype=int),
        a_batch=maps.numpy(),
        s_batch=masks.numpy().astype(float),
        channel_first=True,
    )
    ours = pointing_game(maps, masks)
    np.testing.assert_array_equal(ours.numpy(), np.asarray(theirs, dtype=bool))
    assert 0 < int(ours.sum()) < 12


def test_deletion_equals_quantus_region_perturbation_with_1_pixel_patches(
    bundled_model, bundled_digits
):
    images, labels = bundled_digits
    images, labels = images[:6], labels[:6]
    maps = _untied_maps(6, 4).float()
    regions = 30
    metric = quantus.RegionPerturbation(
        patch_size=1,
        order="morf",
        regions_evaluation=regions,
        perturb_baseline=0.0,
        abs=False,
        normalise=False,
        disable_warnings=True,
    )
    theirs = np.asarray(
        metric(
            model=bundled_model,
            x_batch=images.numpy(),
            y_batch=labels.numpy(),
            a_batch=maps.numpy(),
            device="cpu",
            channel_first=True,
            softmax=True,
        )
    )
    ours = deletion_curves(
        bundled_model, images, maps, target=labels, baselines=0.0, n_steps=784, batch_size=256
    )
    curves = ours.curves.detach().numpy()
    expected = curves[:, :1] - curves[:, 1 : regions + 1]
    np.testing.assert_allclose(expected, theirs, atol=1e-5)
    assert np.abs(theirs[:, -1]).max() > 1e-3  # the deletions change the output
