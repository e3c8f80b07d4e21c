"""ROAD imputation (against a scipy sparse solve), ROAD curves and completeness."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from _helpers import assert_model_unchanged, model_snapshot
from hypothesis import given, settings
from hypothesis import strategies as st

from captum_ext.metrics.remove_and_debias import completeness, road, road_imputation, soundness
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


@pytest.mark.parametrize("solver", ["cg", "direct", "block", "nested"])
@pytest.mark.parametrize("batch", [1, 4, 5])
def test_batched_imputation_matches_scipy(batch, solver):
    generator = torch.Generator().manual_seed(batch)
    images = torch.rand(batch, 3, 16, 20, generator=generator, dtype=torch.float64)
    removed = torch.rand(batch, 16, 20, generator=generator) < 0.5
    removed[0, :8, :10] = True  # one large hole
    ours = road_imputation(images, removed, noise=0.0, solver=solver)
    for i in range(batch):
        expected = _scipy_imputation(images[i].numpy(), removed[i].numpy())
        np.testing.assert_allclose(ours[i].numpy(), expected, atol=1e-5)
    kept = ~removed[:, None].expand_as(images)
    assert torch.equal(ours[kept], images[kept])


def test_float32_imputation_within_1e4_and_noise_only_on_removed_pixels():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 1, 24, 24, generator=generator, dtype=torch.float64)
    removed = torch.rand(2, 24, 24, generator=generator) < 0.7
    exact = road_imputation(images, removed, noise=0.0, solver="direct")
    single = road_imputation(images.float(), removed, noise=0.0, solver="cg")
    assert single.dtype == torch.float32
    assert float((single.double() - exact).abs().max()) < 1e-4
    noisy = road_imputation(images, removed, noise=0.01, generator=torch.Generator().manual_seed(1))
    difference = (noisy - exact)[:, 0]
    assert float(difference[~removed].abs().max()) == 0.0
    assert 0.005 < float(difference[removed].std()) < 0.02


@pytest.mark.parametrize("solver", ["auto", "cg"])
def test_imputation_noise_belongs_to_the_image_and_its_mask(solver):
    """One noise draw for the stacked batch gave an image its neighbours' noise (0.03 apart
    alone and third in a batch). Each image's noise comes from the call's seed, its pixels
    and its mask now; both solver families draw the same noise."""
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 16, 16, generator=generator)
    removed = torch.rand(4, 16, 16, generator=generator) < 0.5

    def impute(rows, solver=solver):
        return road_imputation(
            images[rows], removed[rows], noise=0.05, solver=solver,
            generator=torch.Generator().manual_seed(1),
        )  # fmt: skip

    together = impute([0, 1, 2, 3])
    torch.testing.assert_close(impute([3, 1, 0, 2]), together[[3, 1, 0, 2]], rtol=0, atol=1e-6)
    torch.testing.assert_close(impute([2]), together[[2]], rtol=0, atol=1e-6)
    torch.testing.assert_close(impute([0, 1, 2, 3], "direct"), together, rtol=0, atol=1e-5)
    # the same image under another mask gets other noise
    seeded = torch.Generator().manual_seed(1)
    other = road_imputation(images[[0]], removed[[1]], noise=0.05, generator=seeded)
    noise_other = (other - road_imputation(images[[0]], removed[[1]], noise=0.0))[0, 0]
    noise_own = (together[[0]] - road_imputation(images[[0]], removed[[0]], noise=0.0))[0, 0]
    both = removed[0] & removed[1]
    assert int(both.sum()) > 10
    assert not torch.allclose(noise_other[both], noise_own[both])


def test_cg_on_float32_images_with_a_large_hole_is_as_exact_as_the_direct_solve():
    """One kept pixel per 48 x 48 image: the worst conditioning a mask can give. CG ran in
    float32 on float32 images before and left errors of 3e-4 here (1.5e-2 at 224 x 224)
    although its residual test passed; in float64 it agrees with the sparse LU to rounding."""
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 48, 48, generator=generator, dtype=torch.float64)
    removed = torch.ones(2, 48, 48, dtype=torch.bool)
    removed[0, 0, 0] = False
    removed[1, 24, 3] = False
    exact = road_imputation(images, removed, noise=0.0, solver="direct")
    single = road_imputation(images.float(), removed, noise=0.0, solver="cg")
    assert single.dtype == torch.float32
    assert float((single.double() - exact).abs().max()) < 1e-6


def test_cg_warns_when_it_stops_early_and_auto_then_factorises(monkeypatch):
    """``solver="cg"`` names the unconverged images in a RuntimeWarning; ``"auto"`` off the
    CPU (simulated here) re-solves them by the nested factorisation, silently and exactly,
    and keeps CG's answer for the images that converged."""
    import captum_ext.metrics.remove_and_debias as module

    generator = torch.Generator().manual_seed(1)
    images = torch.rand(3, 2, 20, 20, generator=generator, dtype=torch.float64)
    removed = torch.rand(3, 20, 20, generator=generator) < 0.3
    removed[1] = True
    removed[1, 0, 0] = False  # needs far more than 40 iterations; the others far fewer
    exact = road_imputation(images, removed, noise=0.0, solver="direct")
    with pytest.warns(RuntimeWarning, match=r"1 of 3 images.*max_iterations`=40"):
        stopped = road_imputation(images, removed, noise=0.0, solver="cg", max_iterations=40)
    assert float((stopped[1] - exact[1]).abs().max()) > 1e-3
    assert float((stopped[[0, 2]] - exact[[0, 2]]).abs().max()) < 1e-5

    monkeypatch.setattr(module, "_auto_factorises_on", lambda device: False)
    calls = []
    nested = module._nested_solve
    monkeypatch.setattr(
        module, "_nested_solve", lambda x, r, *a: calls.append(len(x)) or nested(x, r, *a)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        auto = road_imputation(images, removed, noise=0.0, solver="auto", max_iterations=40)
    assert calls == [1]
    assert float((auto[1] - exact[1]).abs().max()) < 1e-10
    assert torch.equal(auto[[0, 2]], stopped[[0, 2]])


def test_without_float64_auto_factorises_on_the_cpu_and_cg_warns(monkeypatch):
    """Apple's MPS has no float64 (simulated on the CPU here): "auto" and the factorising
    solvers compute on the CPU (exact; here the same call), CG runs in float32 and says so."""
    import captum_ext.metrics.remove_and_debias as module

    generator = torch.Generator().manual_seed(2)
    images = torch.rand(2, 3, 32, 32, generator=generator)
    removed = torch.ones(2, 32, 32, dtype=torch.bool)
    removed[:, 5, 7] = False
    exact = road_imputation(images.double(), removed, noise=0.0, solver="direct")
    expected = road_imputation(images, removed, noise=0.0)
    on_mps = {"now": True}  # the outer call's images are "on MPS", the re-call's on the CPU
    monkeypatch.setattr(module, "_lacks_float64", lambda device: on_mps["now"])
    monkeypatch.setattr(module, "_auto_factorises_on", lambda device: not on_mps["now"])
    calls = []
    original = module.road_imputation

    def on_the_cpu(x, *args, **kwargs):
        calls.append(x.device.type)
        on_mps["now"] = False
        try:
            return original(x, *args, **kwargs)
        finally:
            on_mps["now"] = True

    monkeypatch.setattr(module, "road_imputation", on_the_cpu)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = road_imputation(images, removed, noise=0.0)
    assert calls == ["cpu"]  # the one re-call, with the images on the CPU
    assert torch.equal(got, expected)
    with pytest.warns(RuntimeWarning, match="no float64 there, so CG runs in float32"):
        single = road_imputation(images, removed, noise=0.0, solver="cg")
    error = float((single.double() - exact).abs().max())
    assert 1e-5 < error < 1e-2  # float32 CG's error on a one-pixel-known image


def test_block_solver_chunks_float32_and_empty_masks_agree_with_direct(monkeypatch):
    """The batched block Cholesky in chunks equals one direct solve of the whole batch; an
    image with nothing removed comes back unchanged; float32 images are solved in float64."""
    import captum_ext.metrics.remove_and_debias as module

    generator = torch.Generator().manual_seed(3)
    images = torch.rand(7, 2, 9, 11, generator=generator, dtype=torch.float64)
    removed = torch.rand(7, 9, 11, generator=generator) < torch.rand(7, 1, 1, generator=generator)
    removed[0] = False
    removed[1] = True
    removed[1, 4, 5] = False  # a single kept pixel: the whole image is one hole
    exact = road_imputation(images, removed, noise=0.0, solver="direct")
    monkeypatch.setattr(module, "_BLOCK_CHUNK_ELEMENTS", 3 * 9 * 11 * 11)  # chunks of 3 images
    chunked = road_imputation(images, removed, noise=0.0, solver="block")
    np.testing.assert_allclose(chunked.numpy(), exact.numpy(), atol=1e-10, rtol=0)
    assert torch.equal(chunked[0], images[0])
    single = road_imputation(images.float(), removed, noise=0.0, solver="block")
    assert single.dtype == torch.float32
    assert float((single.double() - exact).abs().max()) < 1e-6
    assert road_imputation(images, removed, noise=0.0).sub(exact).abs().max() < 1e-10  # auto


@pytest.mark.parametrize("shape", [(13, 17), (9, 1), (1, 7)])
def test_direct_solver_equals_the_pixel_by_pixel_scipy_system_to_1e10(shape, monkeypatch):
    """The direct solver (SuperLU in symmetric mode: minimum-degree ordering of A + A^T,
    diagonal pivots) against the independently built system solved by ``spsolve`` with its
    default (pivoting, COLAMD) settings, to 1e-10: odd sizes, 3 channels, a batch of mixed
    masks (none removed, one kept pixel, a large hole, random densities) split into several
    factorisations; float32 images are solved in float64 and rounded once."""
    import captum_ext.metrics.remove_and_debias as module

    h, w = shape
    generator = torch.Generator().manual_seed(h * 31 + w)
    images = torch.rand(6, 3, h, w, generator=generator, dtype=torch.float64)
    removed = _mixed_masks(6, h, w, seed=h * w)
    removed.view(6, -1)[:, 0] = False  # keep one pixel per image
    expected = [_scipy_imputation(images[i].numpy(), removed[i].numpy()) for i in range(6)]
    whole = road_imputation(images, removed, noise=0.0, solver="direct")
    monkeypatch.setattr(module, "_DIRECT_UNKNOWNS", max(1, h * w // 3))  # several groups
    grouped = road_imputation(images, removed, noise=0.0, solver="direct")
    for i in range(6):
        np.testing.assert_allclose(whole[i].numpy(), expected[i], atol=1e-10, rtol=0)
        np.testing.assert_allclose(grouped[i].numpy(), expected[i], atol=1e-10, rtol=0)
    single = road_imputation(images.float(), removed, noise=0.0, solver="direct")
    assert single.dtype == torch.float32
    for i in range(6):
        rounded = _scipy_imputation(images[i].float().double().numpy(), removed[i].numpy())
        np.testing.assert_allclose(single[i].double().numpy(), rounded, atol=1e-6, rtol=0)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 3),
    c=st.integers(1, 3),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    share=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_block_and_nested_solvers_equal_direct_for_any_shape(n, c, h, w, share, seed):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(n, c, h, w, generator=generator, dtype=torch.float64)
    removed = torch.rand(n, h, w, generator=generator) < share
    removed.view(n, -1)[:, seed % (h * w)] = False  # keep one pixel per image
    block = road_imputation(images, removed, noise=0.0, solver="block")
    direct = road_imputation(images, removed, noise=0.0, solver="direct")
    assert block.shape == images.shape
    np.testing.assert_allclose(block.numpy(), direct.numpy(), atol=1e-9, rtol=0)
    nested = road_imputation(images, removed, noise=0.0, solver="nested")
    np.testing.assert_allclose(nested.numpy(), direct.numpy(), atol=1e-10, rtol=0)


def _mixed_masks(n: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Random masks of every density, one with a single kept pixel, one with none removed."""
    generator = torch.Generator().manual_seed(seed)
    removed = torch.rand(n, h, w, generator=generator) < torch.rand(n, 1, 1, generator=generator)
    removed[0] = False
    if n > 1:
        removed[1] = True
        removed[1, h // 2, w - 1] = False  # the whole image is one hole around one pixel
    if n > 2:
        removed[2, :, : max(1, w // 2)] = True  # a large hole
    return removed


@pytest.mark.parametrize("shape", [(7, 13), (13, 7), (1, 9), (9, 1), (1, 1), (2, 3), (21, 18)])
def test_nested_solver_equals_the_sparse_lu_and_one_by_one(shape):
    """The nested-dissection Cholesky solves the same systems as scipy's sparse LU (1e-10,
    float64) on odd sizes, one-pixel rows and columns, 3 channels and a batch of mixed masks;
    each image alone gives the same result as in the batch (10 systems are gathered with the
    systems last, one alone row by row)."""
    h, w = shape
    generator = torch.Generator().manual_seed(h * 100 + w)
    images = torch.rand(10, 3, h, w, generator=generator, dtype=torch.float64)
    removed = _mixed_masks(10, h, w, seed=h + w)
    removed.view(10, -1)[:, -1] = False  # keep one pixel per image
    exact = road_imputation(images, removed, noise=0.0, solver="direct")
    nested = road_imputation(images, removed, noise=0.0, solver="nested")
    np.testing.assert_allclose(nested.numpy(), exact.numpy(), atol=1e-10, rtol=0)
    assert torch.equal(nested[0], images[0])  # nothing removed: unchanged
    for i in range(10):
        alone = road_imputation(images[i : i + 1], removed[i : i + 1], noise=0.0, solver="nested")
        np.testing.assert_allclose(alone[0].numpy(), nested[i].numpy(), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="removed"):  # every pixel removed: nothing to impute from
        road_imputation(images[:1], torch.ones(1, h, w, dtype=torch.bool), solver="nested")


def test_nested_solver_matches_the_pixel_by_pixel_scipy_system_on_a_larger_image(monkeypatch):
    """A 40 x 37 image (several dissection levels) against the independently built scipy
    system; chunks of one image give the same result; float32 comes back float32."""
    import captum_ext.metrics.remove_and_debias as module

    generator = torch.Generator().manual_seed(11)
    images = torch.rand(3, 2, 40, 37, generator=generator, dtype=torch.float64)
    removed = (
        torch.rand(3, 40, 37, generator=generator) < torch.tensor([0.3, 0.6, 0.95])[:, None, None]
    )
    removed[2, 0, 0] = False
    ours = road_imputation(images, removed, noise=0.0, solver="nested")
    for i in range(3):
        expected = _scipy_imputation(images[i].numpy(), removed[i].numpy())
        np.testing.assert_allclose(ours[i].numpy(), expected, atol=1e-10, rtol=0)
    monkeypatch.setattr(module, "_NESTED_CHUNK_PIXELS", 1)  # one image per chunk
    chunked = road_imputation(images, removed, noise=0.0, solver="nested")
    np.testing.assert_allclose(chunked.numpy(), ours.numpy(), atol=1e-12, rtol=0)
    single = road_imputation(images.float(), removed, noise=0.0, solver="nested")
    assert single.dtype == torch.float32
    assert float((single.double() - ours).abs().max()) < 1e-6


@pytest.mark.parametrize("shape", [(1, 1), (1, 10), (10, 1), (7, 13), (30, 17)])
def test_nested_dissection_eliminates_every_pixel_once_children_first(shape):
    """The symbolic plan: every pixel is eliminated by exactly one front, and each front's
    update set (the ring around its box) is eliminated later."""
    from captum_ext.metrics.remove_and_debias import _NESTED_LEAF, _nested_plan

    h, w = shape
    plan = _nested_plan(h, w, _NESTED_LEAF)
    eliminated = torch.cat([group.eliminated for group in plan])
    assert torch.equal(eliminated.sort().values, torch.arange(h * w))
    step = torch.empty(h * w, dtype=torch.long)
    step[eliminated] = torch.arange(h * w)
    for group in plan:
        if group.nu:
            first = step[group.eliminated].view(group.fronts, group.ne).max(dim=1).values
            later = step[group.update].view(group.fronts, group.nu).min(dim=1).values
            assert bool((later > first).all())


def test_auto_splits_the_batch_between_nested_and_direct(monkeypatch):
    """'auto' on the CPU sends dense masks to a whole-grid Cholesky (block when narrow, nested
    when wide) and sparse ones to the sparse LU, and puts every image back in its place."""
    import captum_ext.metrics.remove_and_debias as module

    generator = torch.Generator().manual_seed(4)
    images = torch.rand(5, 1, 12, 10, generator=generator, dtype=torch.float64)
    removed = (
        torch.rand(5, 12, 10, generator=generator)
        < torch.tensor([0.9, 0.1, 0.7, 0.2, 0.95])[:, None, None]
    )
    removed.view(5, -1)[:, 0] = False
    calls = []
    factorised = module._factorised

    def spy(inputs, mask, solver):
        calls.append((solver, inputs.shape[0]))
        return factorised(inputs, mask, solver)

    monkeypatch.setattr(module, "_factorised", spy)
    auto = road_imputation(images, removed, noise=0.0)
    assert sorted(calls) == [("block", 3), ("direct", 2)]  # 10 px wide: block
    monkeypatch.setattr(module, "_BLOCK_MAX_WIDTH", 8)
    calls.clear()
    wide = road_imputation(images, removed, noise=0.0)
    assert sorted(calls) == [("direct", 2), ("nested", 3)]
    np.testing.assert_allclose(wide.numpy(), auto.numpy(), atol=1e-12, rtol=0)
    exact = road_imputation(images, removed, noise=0.0, solver="direct")
    np.testing.assert_allclose(auto.numpy(), exact.numpy(), atol=1e-10, rtol=0)


def test_auto_sends_compact_holes_and_dense_masks_to_the_whole_grid_solvers():
    from captum_ext.metrics.remove_and_debias import _whole_grid_is_faster

    generator = torch.Generator().manual_seed(6)
    noise = torch.rand(4, 40, 40, generator=generator)
    removed = noise < torch.tensor([0.3, 0.55, 0.7, 0.0])[:, None, None]
    removed[3, 10:30, 10:30] = True  # one compact hole: 25% removed, 20% with no kept neighbour
    assert _whole_grid_is_faster(removed, "block").tolist() == [False, True, True, True]
    assert _whole_grid_is_faster(removed, "nested").tolist() == [False, False, True, True]


def test_imputation_errors_name_the_argument():
    images = torch.rand(1, 1, 4, 4)
    with pytest.raises(ValueError, match="removed"):
        road_imputation(images, torch.ones(1, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="removed"):
        road_imputation(images, torch.ones(2, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="noise"):
        road_imputation(images, torch.zeros(1, 4, 4, dtype=torch.bool), noise=-1.0)
    with pytest.raises(ValueError, match="solver"):
        road_imputation(images, torch.zeros(1, 4, 4, dtype=torch.bool), solver="lu")


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


def _soundness_by_loop(maps, scores, counts, threshold, floor):
    """The accumulation written step by step from the definition (one example)."""
    order = sorted(range(len(maps)), key=lambda k: maps[k])  # increasing, no ties here
    false_mass, previous, previous_count, curve = 0.0, 0.0, len(maps), []
    for count, score in zip(counts, scores):
        kept = [maps[k] for k in order[count:]]
        added = sum(maps[k] for k in order[count:previous_count])
        curve.append((sum(kept) - false_mass) / (sum(kept) + 1e-6))
        if floor is None or score > floor:
            if score - previous <= threshold:
                false_mass += added
        previous, previous_count = score, count
    return curve


def test_soundness_accumulates_false_mass_as_defined(oracle):
    model = _softmax_model(oracle)
    generator = torch.Generator().manual_seed(5)
    maps = torch.rand(1, 1, 12, 12, generator=generator, dtype=torch.float64)
    maps[0, 0, 0, 0], maps[0, 0, 0, 1] = 0.0, 1.0  # already in [0, 1]
    ratios = [0.9, 0.7, 0.5, 0.3, 0.1]
    curves = soundness(
        model,
        oracle.inputs[:1],
        maps,
        target=oracle.target[:1],
        removed_fractions=ratios,
        threshold=0.01,
        score_floor=None,
        batch_size=2,
    )
    counts = [int(144 * r) for r in ratios]
    expected = _soundness_by_loop(
        maps.flatten().tolist(), curves.score[0].tolist(), counts, 0.01, None
    )
    np.testing.assert_allclose(curves.soundness[0].numpy(), expected, rtol=1e-12)
    assert curves.soundness.shape == curves.score.shape == (1, 5)


def test_on_a_model_blind_to_its_input_all_re_added_mass_is_false(oracle):
    """The score never moves after the first step, so everything re-added later is false."""

    class Blind(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = torch.nn.Parameter(torch.tensor([2.0, 0.0, -1.0]))

        def forward(self, x):
            return self.bias.expand(x.shape[0], 3) + 0.0 * x.sum()

    maps = torch.rand(3, 1, 12, 12, generator=torch.Generator().manual_seed(4))
    ratios = [0.9, 0.6, 0.3]
    curves = soundness(Blind(), oracle.inputs[:3], maps, target=0, removed_fractions=ratios)
    flat = maps.flatten(1).double()
    flat = (flat - flat.min(1, keepdim=True).values) / (
        flat.max(1, keepdim=True).values - flat.min(1, keepdim=True).values
    )
    kept_first = flat.sort(dim=1).values[:, int(144 * 0.9) :].sum(1)
    kept_last = flat.sort(dim=1).values[:, int(144 * 0.3) :].sum(1)
    torch.testing.assert_close(curves.false_mass, kept_last - kept_first)
    assert torch.allclose(curves.soundness[:, 0], torch.ones(3, dtype=torch.float64), atol=1e-5)
    assert bool((curves.soundness[:, -1] < curves.soundness[:, 0]).all())
    with pytest.raises(ValueError, match="removed_fractions"):
        soundness(Blind(), oracle.inputs[:3], maps, removed_fractions=[0.1, 0.5])


@pytest.mark.cuda
@pytest.mark.parametrize("solver", ["block", "nested", "nested_mixed", "cg", "auto"])
def test_imputation_on_cuda_equals_the_cpu_direct_solve(solver):
    generator = torch.Generator().manual_seed(5)
    images = torch.rand(6, 3, 20, 24, generator=generator, dtype=torch.float64)
    removed = torch.rand(6, 20, 24, generator=generator) < 0.6
    removed[0, :10, :12] = True
    expected = road_imputation(images, removed, noise=0.0, solver="direct")
    got = road_imputation(images.cuda(), removed.cuda(), noise=0.0, solver=solver)
    assert got.device.type == "cuda"
    np.testing.assert_allclose(got.cpu().numpy(), expected.numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(13, 17), (21, 8)])
def test_mixed_precision_nested_solver_refines_a_float32_factor_to_the_scipy_solution(
    shape, monkeypatch
):
    """``_nested_solve(..., "mixed")``: float32 factorisation, float64 iterative refinement.
    Against the pixel-by-pixel scipy system to 1e-10 on odd sizes, 3 channels, mixed masks
    (a large hole, one kept pixel, nothing removed) in chunks of two images, float64 and
    float32 inputs; the one-solve float32 answer is not that close, so refinement did the
    work; no system needed the float64 fallback; each image alone gives the same result."""
    import captum_ext.metrics.remove_and_debias as module

    h, w = shape
    generator = torch.Generator().manual_seed(h + 7 * w)
    images = torch.rand(6, 3, h, w, generator=generator, dtype=torch.float64)
    removed = _mixed_masks(6, h, w, seed=h * w + 1)
    removed.view(6, -1)[:, 0] = False
    expected = np.stack(
        [_scipy_imputation(images[i].numpy(), removed[i].numpy()) for i in range(6)]
    )
    fallback, solves = [], []
    double, substitute = module._nested_double, module._nested_substitute
    monkeypatch.setattr(
        module, "_nested_double", lambda x, *a: fallback.append(len(x)) or double(x, *a)
    )
    monkeypatch.setattr(module, "_nested_substitute", lambda *a: solves.append(1) or substitute(*a))
    monkeypatch.setattr(module, "_NESTED_CHUNK_PIXELS", 2 * h * w)  # chunks of two images
    mixed = module._nested_solve(images, removed[:, None], "mixed")
    np.testing.assert_allclose(mixed.numpy(), expected, atol=1e-10, rtol=0)
    assert fallback == [] and len(solves) >= 3 * 2  # three chunks, at least two solves each
    assert torch.equal(mixed[0], images[0])  # nothing removed
    # one float32 solve alone: float32 accuracy only
    values, rhs, _, _ = module._nested_system(images[2:3], removed[2:3])
    plan = module._nested_plan(h, w, module._NESTED_LEAF)
    arena, rhs_arena = module._NestedWorkspaces(plan, 3, images.device).get(1, torch.float32)
    factors, broken = module._nested_factorise(values, plan, arena)
    once = module._nested_substitute(factors, plan, rhs.float(), rhs_arena)
    once = once.transpose(1, 2).reshape(3, h, w).double().numpy()
    assert not bool(broken.any())
    assert 1e-9 < np.abs(once - expected[2]).max() < 1e-4
    single = module._nested_solve(images.float(), removed, "mixed")
    assert single.dtype == torch.float32
    for i in range(6):
        rounded = _scipy_imputation(images[i].float().double().numpy(), removed[i].numpy())
        np.testing.assert_allclose(single[i].double().numpy(), rounded, atol=1e-6, rtol=0)
        alone = module._nested_solve(images[i : i + 1], removed[i : i + 1], "mixed")
        np.testing.assert_allclose(alone[0].numpy(), mixed[i].numpy(), atol=1e-10, rtol=0)
    # the public solver name runs this path (float32 substitutions, refinement)
    solves.clear()
    public = road_imputation(images, removed, noise=0.0, solver="nested_mixed")
    np.testing.assert_allclose(public.numpy(), expected, atol=1e-10, rtol=0)
    assert len(solves) >= 2


def test_mixed_precision_nested_solver_falls_back_to_float64_per_system(monkeypatch):
    """Systems whose refinement has not converged within ``_REFINEMENT_STEPS`` solves (here
    one: nothing to compare the first correction with), or whose float32 factorisation
    breaks down, are solved again in float64 -- only those; the result is exact either way."""
    import captum_ext.metrics.remove_and_debias as module

    generator = torch.Generator().manual_seed(2)
    images = torch.rand(4, 2, 11, 9, generator=generator, dtype=torch.float64)
    removed = _mixed_masks(4, 11, 9, seed=5)
    removed[3, :, :] = torch.rand(11, 9, generator=generator) < 0.5
    removed.view(4, -1)[:, 0] = False
    exact = road_imputation(images, removed, noise=0.0, solver="direct")
    fallback = []
    double = module._nested_double
    monkeypatch.setattr(
        module, "_nested_double", lambda x, *a: fallback.append(len(x)) or double(x, *a)
    )
    monkeypatch.setattr(module, "_REFINEMENT_STEPS", 1)
    once = module._nested_solve(images, removed, "mixed")
    assert fallback == [3]  # image 0 (nothing removed) converged at once, the others did not
    np.testing.assert_allclose(once.numpy(), exact.numpy(), atol=1e-10, rtol=0)
    monkeypatch.setattr(module, "_REFINEMENT_STEPS", 8)
    factorise = module._nested_factorise

    def breaks_down_on_image_two(values, plan, arena):
        factors, broken = factorise(values, plan, arena)
        if arena.dtype == torch.float32:
            broken = broken.clone()
            broken[2] = True
        return factors, broken

    monkeypatch.setattr(module, "_nested_factorise", breaks_down_on_image_two)
    fallback.clear()
    broken = module._nested_solve(images, removed, "mixed")
    assert fallback == [1]
    np.testing.assert_allclose(broken.numpy(), exact.numpy(), atol=1e-10, rtol=0)


def test_mixed_precision_refinement_corrects_until_the_error_left_is_below_tolerance(
    monkeypatch,
):
    """One hole over the whole 24 x 24 image but its border: two solves (the float32 answer
    and one correction) are not enough for 1e-12, a third is made; the result equals the
    float64 sparse LU to 1e-12."""
    import captum_ext.metrics.remove_and_debias as module

    images = torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(0)).double()
    removed = torch.zeros(1, 24, 24, dtype=torch.bool)
    removed[:, 1:-1, 1:-1] = True
    exact = road_imputation(images, removed, noise=0.0, solver="direct")
    solves = []
    substitute = module._nested_substitute
    monkeypatch.setattr(module, "_nested_substitute", lambda *a: solves.append(1) or substitute(*a))
    mixed = module._nested_solve(images, removed, "mixed")
    assert len(solves) >= 3
    np.testing.assert_allclose(mixed.numpy(), exact.numpy(), atol=1e-12, rtol=0)


def test_non_finite_maps_are_refused_by_road_completeness_and_soundness(oracle):
    """A NaN in a map used to rank silently (argsort puts it last) and give curves."""
    maps = torch.rand(2, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    maps[1, 0, 3, 3] = float("nan")
    for metric in (road, completeness, soundness):
        with pytest.raises(ValueError, match="`attributions` contains NaN or infinite"):
            metric(oracle.model, oracle.inputs[:2], maps, target=0)
    maps[1, 0, 3, 3] = float("inf")
    with pytest.raises(ValueError, match="`attributions` contains NaN or infinite"):
        road(oracle.model, oracle.inputs[:2], maps, target=0)


def test_inputs_are_checked_before_the_model_runs(oracle):
    """A 1-tuple is Captum's convention and works; the rest used to fail deep inside torch
    (3-D or integer images) or to give NaN curves (NaN pixels)."""
    maps = torch.rand(2, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    images = oracle.inputs[:2]
    nan_images = images.clone()
    nan_images[0, 0, 0, 0] = float("nan")
    for metric in (road, completeness, soundness):
        plain = metric(oracle.model, images, maps, target=0, noise=0.0)
        as_tuple = metric(oracle.model, (images,), maps, target=0, noise=0.0)
        for got, expected in zip(as_tuple, plain):
            torch.testing.assert_close(got, expected)
        with pytest.raises(ValueError, match=r"`inputs` must be a floating point batch"):
            metric(oracle.model, images[:, 0], maps, target=0)
        with pytest.raises(ValueError, match=r"`inputs` must be a floating point batch"):
            metric(oracle.model, (images * 255).to(torch.uint8), maps, target=0)
        with pytest.raises(ValueError, match=r"`inputs` contains NaN"):
            metric(oracle.model, nan_images, maps, target=0)
    with pytest.raises(ValueError, match=r"`inputs` must be floating point images without NaN"):
        road_imputation(nan_images, torch.zeros(2, 12, 12, dtype=torch.bool))


def _constant_model(gap: float, dtype: torch.dtype) -> torch.nn.Module:
    """Logits (gap, 0) for every image: the target's probability is sigmoid(gap) exactly."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([gap, 0.0]))
    return model.to(dtype).eval()


def test_float64_models_are_scored_in_float64():
    """A float64 model's scores keep float64 digits: with a logit gap of 25 the probability is
    1 - 1.4e-11, which float32 rounds to exactly 1 (road returned float32 before)."""
    model = _constant_model(25.0, torch.float64)
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    maps = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(1))
    expected = torch.sigmoid(torch.tensor(25.0, dtype=torch.float64))
    curves = road(model, x, maps, target=0, percentages=(0.25, 0.5))
    assert curves.probability.dtype == torch.float64
    torch.testing.assert_close(curves.probability, expected.expand(2, 2), rtol=0, atol=1e-15)
    assert bool((curves.probability < 1).all())
    sound = soundness(model, x, maps, target=0, removed_fractions=(0.5, 0.25))
    torch.testing.assert_close(sound.score, expected.expand(2, 2), rtol=0, atol=1e-15)
    drop = completeness(model, x, maps, target=0, thresholds=(0.5,)).drop
    assert drop.dtype == torch.float64 and bool((drop == 0).all())


def test_half_precision_models_are_scored_in_float32():
    model = _constant_model(3.0, torch.bfloat16)
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    curves = road(model, x, torch.rand(2, 8, 8), target=0, percentages=(0.5,))
    assert curves.probability.dtype == torch.float32
    torch.testing.assert_close(curves.probability, torch.sigmoid(torch.tensor(3.0)).expand(2, 1))


def test_road_imputation_refuses_a_soft_removed_mask():
    """A float mask in (0, 1) became all True (every pixel removed: a misleading error) and
    a 0/1 one of another dtype is read as the bool mask it means."""
    x = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"`removed` must be a bool mask.*float32 values in"):
        road_imputation(x, torch.full((1, 8, 8), 0.5))
    removed = torch.zeros(1, 8, 8, dtype=torch.bool)
    removed[0, 2:5, 3:6] = True
    expected = road_imputation(x, removed, noise=0.0)
    torch.testing.assert_close(road_imputation(x, removed.long(), noise=0.0), expected)
    torch.testing.assert_close(road_imputation(x, removed.float(), noise=0.0), expected)


def test_cam_maps_smaller_than_the_input_are_upsampled_as_deletion_does(oracle):
    """road, completeness and soundness refused a CAM's (N, 1, h, w) maps ("got (8, 3, 3)",
    the shape after summing the channels), where deletion and insertion upsample them. They
    now upsample bilinearly too: the same curves as the maps upsampled by hand."""
    from captum_ext._utils.maps import upsample_maps

    model = _softmax_model(oracle)
    small = torch.rand(8, 1, 3, 3, generator=torch.Generator().manual_seed(2))
    full = upsample_maps(small.double(), tuple(oracle.inputs.shape[-2:]))
    x, target = oracle.inputs, oracle.target
    for function, field, options in (
        (road, "probability", {"percentages": [0.3, 0.6]}),
        (completeness, "drop", {"thresholds": [0.5]}),
        (soundness, "soundness", {"removed_fractions": [0.7, 0.3]}),
    ):
        got = getattr(function(model, x, small, target=target, **options), field)
        expected = getattr(function(model, x, full, target=target, **options), field)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"`attributions` has 2 channels; expected 1 or 3"):
        road(model, x, torch.rand(8, 2, 12, 12))


def test_the_imputers_and_scores_of_the_spec_for_soundness_and_completeness(oracle):
    """The spec gives both metrics imputer="road" | "mean" | "blur" | callable and score=
    "probability" | "accuracy"; soundness had no imputer and completeness neither "blur"
    nor "accuracy". Each imputer is tied to its definition through a callable doing the
    same by hand."""
    from captum_ext.metrics._perturbation import gaussian_blur

    model = _softmax_model(oracle)
    x, target = oracle.inputs, oracle.target
    maps = torch.rand(8, 1, 12, 12, generator=torch.Generator().manual_seed(3))
    by_hand = {
        "mean": lambda images, removed: torch.where(
            removed, images.mean(dim=(2, 3), keepdim=True), images
        ),
        "blur": lambda images, removed: torch.where(
            removed, gaussian_blur(images, 11, 5.0), images
        ),
    }
    for name, manual in by_hand.items():
        for function, field, options in (
            (completeness, "drop", {"thresholds": [0.4, 0.8]}),
            (soundness, "soundness", {"removed_fractions": [0.7, 0.4, 0.1]}),
        ):
            got = getattr(function(model, x, maps, target=target, imputer=name, **options), field)
            expected = getattr(
                function(model, x, maps, target=target, imputer=manual, **options), field
            )
            torch.testing.assert_close(got, expected, atol=0, rtol=0)
    accuracy = completeness(model, x, maps, target=target, imputer="mean", score="accuracy")
    probability = completeness(model, x, maps, target=target, imputer="mean")
    assert set(accuracy.drop.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert not torch.equal(accuracy.drop, probability.drop)
    with torch.no_grad():  # correctness drop by hand at the first threshold
        removed = maps[:, 0] > 0.9 * maps.flatten(1).amax(1).view(8, 1, 1)
        filled = by_hand["mean"](x, removed[:, None])
        hand = (model(x).argmax(1) == target).double() - (
            model(filled).argmax(1) == target
        ).double()
    torch.testing.assert_close(accuracy.drop[:, 0].double(), hand)
    for function in (completeness, soundness):
        with pytest.raises(ValueError, match="`imputer`='zeros'"):
            function(model, x, maps, imputer="zeros")
        with pytest.raises(ValueError, match="`imputer` must return images of shape"):
            function(model, x, maps, imputer=lambda images, removed: images[:1])
    with pytest.raises(ValueError, match="`score`='logit'"):
        completeness(model, x, maps, score="logit")


@pytest.mark.parametrize(
    "layout",
    [lambda m: m.transpose(1, 2), lambda m: m.permute(1, 2, 0), lambda m: m.flatten(1)],
    ids=["N-W-H", "H-W-N", "N-HW"],
)
def test_a_mask_in_another_layout_is_refused_not_read_in_the_wrong_order(layout):
    """A mask with N * H * W elements in any shape was reshaped without a word: a transposed
    (N, W, H) mask of non-square images removed other pixels than the ones it marks."""
    x = torch.rand(2, 3, 6, 10, dtype=torch.float64)
    removed = torch.zeros(2, 6, 10, dtype=torch.bool)
    removed[:, 1:4, 2:7] = True
    with pytest.raises(ValueError, match=r"`removed` must have shape .* got \("):
        road_imputation(x, layout(removed), noise=0.0)
    # the documented layouts give one answer
    filled = road_imputation(x, removed, noise=0.0)
    torch.testing.assert_close(road_imputation(x, removed[:, None], noise=0.0), filled)


def test_fractions_given_as_a_tensor_are_taken_as_a_list_is():
    """A 1-D tensor of fractions was refused as "must be a number, got Tensor tensor(0.2)"."""
    model = _constant_model(3.0, torch.float64)
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    maps = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(1))
    fractions = (0.6, 0.2)  # soundness takes them decreasing
    for metric, argument in ((road, "percentages"), (soundness, "removed_fractions")):
        as_list = metric(model, x, maps, target=0, noise=0.0, **{argument: list(fractions)})
        as_tensor = metric(
            model, x, maps, target=0, noise=0.0, **{argument: torch.tensor(fractions)}
        )
        for got, expected in zip(as_tensor, as_list):
            torch.testing.assert_close(got, expected)
    drop = completeness(model, x, maps, target=0, thresholds=torch.tensor([0.5])).drop
    assert drop.shape == (2, 1)
    with pytest.raises(ValueError, match="`percentages` must be 1-D"):
        road(model, x, maps, target=0, percentages=torch.tensor([[0.2, 0.6]]))


def test_a_numpy_imputer_returning_float64_is_read_in_the_images_dtype(oracle):
    """A callable imputer written with numpy returns float64 (or CPU) arrays turned into
    tensors: the model reads them in the images' dtype, and a non-float result is refused
    by name (it reached the model as "Input type (double) and bias type (float)")."""
    model = _softmax_model(oracle)
    maps = torch.arange(144.0).view(1, 1, 12, 12).expand(8, 1, 12, 12)

    def numpy_mean(images, removed):
        x, m = images.numpy().astype(np.float64), removed.numpy()
        return torch.from_numpy(np.where(m, x.mean(axis=(2, 3), keepdims=True), x))

    by_numpy = completeness(model, oracle.inputs, maps, target=oracle.target, imputer=numpy_mean)
    by_mean = completeness(model, oracle.inputs, maps, target=oracle.target, imputer="mean")
    torch.testing.assert_close(by_numpy.drop, by_mean.drop, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="`imputer` must return floating-point"):
        completeness(
            model, oracle.inputs, maps, target=oracle.target, imputer=lambda x, m: m.expand_as(x)
        )
