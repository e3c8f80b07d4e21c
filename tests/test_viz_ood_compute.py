"""captum_ext.viz.ood: compute_ood (numbers, no drawing) and render_ood."""

from __future__ import annotations

import pytest
import torch
from _helpers import make_tiny_cnn

from captum_ext.inversion import TIE
from captum_ext.metrics import aupr, auroc, energy, fpr_at_tpr, softmax_confidence
from captum_ext.viz.ood import IN_DISTRIBUTION, OODData, compute_ood, ood_section, render_ood

matplotlib = pytest.importorskip("matplotlib")
SHAPE = (3, 6, 6)
SMALL = {
    "input_shape": SHAPE,
    "generator_steps": 2,
    "generator_batch_size": 6,
    "latent_dim": 8,
    "generator_width": 8,
    "batch_size": 16,
}


@pytest.fixture(scope="module")
def setting():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    plain = make_tiny_cnn(dtype=torch.float32, num_classes=4)
    x, y = torch.randn(32, *SHAPE, generator=gen), torch.arange(32) % 4
    tie = TIE(plain, **SMALL)
    tie.fit(x, y, epochs=1, progress=False)
    ood = {"bright": 3 + torch.rand(12, *SHAPE, generator=gen), "flat": torch.zeros(6, *SHAPE)}
    yield tie, plain, x[:16], ood
    torch.set_num_threads(threads)


def test_compute_draws_nothing_and_equals_the_metric_functions(setting, no_drawing):
    tie, plain, inside, ood = setting
    data = compute_ood(tie, inside, ood, plain_model=plain, pool_images=5)
    assert isinstance(data, OODData)
    assert data.score_names == ["TIE", "max-softmax", "energy"]
    assert data.counts == {IN_DISTRIBUTION: 16, "bright": 12, "flat": 6}
    everything = {IN_DISTRIBUTION: inside, **ood}
    for name, images in everything.items():
        assert data.garbage[name] == pytest.approx(
            float(tie.predict(images).is_garbage.double().mean())
        )
        # float64 (1 - p_garbage rounds to exactly 1 in float32 below 6e-8: false ties)
        torch.testing.assert_close(
            data.scores[name]["TIE"], tie.in_distribution_score(images), rtol=0, atol=0
        )
        torch.testing.assert_close(
            data.scores[name]["max-softmax"], softmax_confidence(plain, images).double()
        )
        torch.testing.assert_close(data.scores[name]["energy"], energy(plain, images).double())
    assert sorted(data.metrics) == ["bright", "flat"]
    for name in ood:
        for score in data.score_names:
            inner, outer = data.scores[IN_DISTRIBUTION][score], data.scores[name][score]
            assert data.metrics[name][score] == (
                pytest.approx(auroc(inner, outer)),
                pytest.approx(aupr(inner, outer)),
                pytest.approx(fpr_at_tpr(inner, outer)),
            )
    torch.testing.assert_close(data.pool, tie.pool[-5:].cpu())
    assert data.pool_size == tie.pool.shape[0]
    assert data.log["epoch"] == list(tie.log["epoch"])


def test_compute_without_a_plain_model_or_pool(setting, no_drawing):
    tie, _, inside, ood = setting
    data = compute_ood(tie, inside, {"flat": ood["flat"]}, kind="ue", pool_images=0)
    assert data.score_names == ["TIE"] and data.pool is None and data.kind == "ue"
    # float32 scores of the same images, batched differently: equal up to float32 rounding
    # (an ulp apart on some CPUs' kernels, identical on others)
    torch.testing.assert_close(
        data.scores["flat"]["TIE"],
        (1 - tie.ood_score(ood["flat"], kind="ue")).double(),
        rtol=4 * torch.finfo(torch.float32).eps,
        atol=4 * torch.finfo(torch.float32).eps,
    )
    with pytest.raises(ValueError, match="`ood_sets` has a set named 'in-distribution'"):
        compute_ood(tie, inside, {IN_DISTRIBUTION: ood["flat"]})


def test_render_gives_the_sections_page(setting, tmp_path):
    tie, plain, inside, ood = setting
    section = ood_section(tie, inside, ood, tmp_path / "a", plain_model=plain, pool_images=4)
    data = compute_ood(tie, inside, ood, plain_model=plain, pool_images=4)
    rendered = render_ood(data, tmp_path / "b")
    assert rendered.title == section.title and rendered.intro == section.intro
    assert [r.label for r in rendered.rows] == [r.label for r in section.rows]
    assert [r.table and r.table.rows for r in rendered.rows] == [
        r.table and r.table.rows for r in section.rows
    ]
    assert [f.path.name for r in rendered.rows for f in r.figures] == [
        "scores.png",
        "garbage_pool.png",
    ]
