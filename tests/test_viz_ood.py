"""captum_ext.viz.ood: the TIE out-of-distribution report section."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _helpers import make_tiny_cnn
from PIL import Image

from captum_ext.inversion import TIE
from captum_ext.metrics import aupr, auroc, energy, fpr_at_tpr, softmax_confidence
from captum_ext.viz import Report, ood_section

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
    x, y = torch.randn(48, *SHAPE, generator=gen), torch.arange(48) % 4
    tie = TIE(plain, **SMALL)
    tie.fit(x, y, epochs=2, progress=False)
    ood = {"bright": 3 + torch.rand(20, *SHAPE, generator=gen), "tiny": torch.zeros(10, *SHAPE)}
    yield tie, plain, x[:24], ood
    torch.set_num_threads(threads)


def _metric_cell(inside, outside) -> str:
    return (
        f"{auroc(inside, outside):.3f} / {aupr(inside, outside):.3f} / "
        f"{fpr_at_tpr(inside, outside):.3f}"
    )


def test_table_equals_the_metrics_computed_directly(setting, tmp_path):
    tie, plain, inside, ood = setting
    section = ood_section(tie, inside, ood, tmp_path, plain_model=plain)
    table = section.rows[0].table
    assert table.columns == ["images", "count", "sent to garbage", "TIE", "max-softmax", "energy"]
    first = table.rows[0]
    assert first[:3] == [
        "in-distribution",
        "24",
        f"{float(tie.predict(inside).is_garbage.double().mean()):.1%}",
    ]
    tie_in = (1 - tie.ood_score(inside)).double()
    for row, (name, images) in zip(table.rows[1:], ood.items()):
        assert row[0] == name and row[1] == str(images.shape[0])
        assert row[3] == _metric_cell(tie_in, (1 - tie.ood_score(images)).double())
        assert row[4] == _metric_cell(
            softmax_confidence(plain, inside), softmax_confidence(plain, images)
        )
        assert row[5] == _metric_cell(energy(plain, inside), energy(plain, images))
    for row in section.rows[:2]:
        for figure in row.figures:
            with Image.open(figure.path) as picture:
                assert np.asarray(picture, dtype=float).std() > 0
    log = section.rows[2].table
    assert [float(r[0]) for r in log.rows] == [float(e) for e in tie.log["epoch"]]
    report = Report("ood")
    report.add_section(section)
    assert "Does the classifier know" in report.write(tmp_path / "r").read_text(encoding="utf-8")


def test_without_a_plain_model_and_with_the_ue_score(setting, tmp_path):
    tie, _, inside, ood = setting
    section = ood_section(tie, inside, {"bright": ood["bright"]}, tmp_path, kind="ue")
    assert section.rows[0].table.columns == ["images", "count", "sent to garbage", "TIE"]
    expected = _metric_cell(
        (1 - tie.ood_score(inside, kind="ue")).double(),
        (1 - tie.ood_score(ood["bright"], kind="ue")).double(),
    )
    assert section.rows[0].table.rows[1][3] == expected


@pytest.mark.parametrize(
    ("arguments", "error", "pattern"),
    [
        ({"tie": "nope"}, TypeError, "`tie` must be a fitted TIE"),
        ({"ood_sets": {}}, ValueError, "`ood_sets` must be a non-empty mapping"),
        ({"ood_sets": {"x": torch.zeros(3)}}, ValueError, r"`ood_sets\['x'\]` must be"),
        ({"in_distribution": torch.zeros(0, *SHAPE)}, ValueError, "`in_distribution` must be"),
        ({"pool_images": -1}, ValueError, "`pool_images` must be a non-negative int"),
    ],
)
def test_bad_arguments_name_the_argument(setting, tmp_path, arguments, error, pattern):
    tie, _, inside, ood = setting
    call = {"tie": tie, "in_distribution": inside, "ood_sets": ood, **arguments}
    with pytest.raises(error, match=pattern):
        ood_section(
            call["tie"],
            call["in_distribution"],
            call["ood_sets"],
            tmp_path,
            **{k: v for k, v in arguments.items() if k == "pool_images"},
        )


def test_unfitted_tie_is_refused(tmp_path):
    tie = TIE(make_tiny_cnn(dtype=torch.float32, num_classes=4), **SMALL)
    with pytest.raises(ValueError, match="has not been fitted"):
        ood_section(tie, torch.zeros(2, *SHAPE), {"a": torch.ones(2, *SHAPE)}, tmp_path)


def test_grey_pool_grid_shows_its_scale():
    """Issue 19: the garbage-pool grid says what black and white are (a grey-scale bar)."""
    pytest.importorskip("matplotlib")
    from captum_ext.viz.ood import _pool_figure

    pool = torch.randn(12, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    figure = _pool_figure(pool, None, 12)
    bar = figure.axes[-1]
    assert not bar.images and "min to max" in bar.get_ylabel()
    np.testing.assert_allclose(bar.get_ylim(), (float(pool.min()), float(pool.max())), atol=1e-6)
    fixed = _pool_figure(pool, lambda x: x.sigmoid(), 12)
    assert fixed.axes[-1].get_ylabel() == "pixel value"
    np.testing.assert_allclose(fixed.axes[-1].get_ylim(), (0.0, 1.0))
    # colour images have no colour map, hence no bar
    rgb = _pool_figure(pool.repeat(1, 3, 1, 1), None, 12)
    assert all(ax.images or not ax.get_ylabel() for ax in rgb.axes)
