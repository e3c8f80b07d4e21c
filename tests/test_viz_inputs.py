"""captum_ext.viz: what the figures accept from the user and how they draw it.

Display images of every dtype a user has at hand (uint8 tensors from
``torchvision.io.read_image``, bfloat16, 16-bit PNGs, floats on a 0..255 scale), ``alpha``
as any real number, user-supplied text drawn literally (``$`` is not mathtext), every OOD
set in the legend, the class names of the sample grid inside the figure, and no change to
the user's matplotlib state.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

matplotlib = pytest.importorskip("matplotlib")

from captum_ext.bundled import load_bundled_model  # noqa: E402
from captum_ext.data import BUNDLED_CAM_LAYER, denormalize_digits, load_sample_digits  # noqa: E402
from captum_ext.viz import (  # noqa: E402
    EvaluationScores,
    OODData,
    compute_contrastive,
    overlay,
    plot_reliability_diagram,
    render_contrastive,
    render_evaluation,
    render_ood,
    save_colorbar,
    save_png,
    to_uint8_rgb,
)

DOLLARS = "bin_$0_to_$5"  # two '$': mathtext that does not parse
VALID_MATH = "a_$x^2$_b"  # two '$': mathtext that parses, into something else


@pytest.fixture(scope="module")
def two_digits():
    torch.set_num_threads(1)
    model = load_bundled_model()
    images, _ = load_sample_digits()
    images = images[:2]
    return model, images, denormalize_digits(images)


def _pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image).copy()


# ---------------------------------------------------------------------------------------
# display images: uint8 tensors, bfloat16, integer dtypes, floats on 0..255


def test_uint8_display_tensor_draws_as_the_uint8_array(two_digits, tmp_path):
    """A uint8 tensor (what torchvision.io.read_image gives) was cast to float and clipped
    to [0, 1]: a two-level picture. It must draw exactly as the same uint8 array does."""
    model, images, shown = two_digits
    as_uint8 = (shown * 255).round().to(torch.uint8)
    data = compute_contrastive(model, BUNDLED_CAM_LAYER, images)
    render_contrastive(data, as_uint8, tmp_path / "tensor")
    render_contrastive(data, as_uint8.permute(0, 2, 3, 1).numpy(), tmp_path / "array")
    folder = "images/contrastive"
    for name in ("00000_input.png", "00001_input.png", "00000_gradcam.png", "00001_contrast.png"):
        tensor_png = _pixels(tmp_path / "tensor" / folder / name)
        np.testing.assert_array_equal(tensor_png, _pixels(tmp_path / "array" / folder / name))
    picture = _pixels(tmp_path / "tensor" / folder / "00000_input.png")
    np.testing.assert_array_equal(picture[:, :, 0], as_uint8[0, 0].numpy())
    assert len(np.unique(picture)) > 2


def test_bfloat16_tensors_are_drawn(tmp_path):
    image, heat = torch.rand(8, 8, 3), torch.rand(8, 8)
    image16, heat16 = image.bfloat16(), heat.bfloat16()
    expected = overlay(image16.float(), heat16.float())
    np.testing.assert_array_equal(overlay(image16, heat16), expected)
    np.testing.assert_array_equal(to_uint8_rgb(image16), to_uint8_rgb(image16.float()))
    path = save_png(image16, tmp_path / "bf16.png")
    np.testing.assert_array_equal(_pixels(path), to_uint8_rgb(image16.float()))
    # a bfloat16 tensor that needs grad, and a half one
    np.testing.assert_array_equal(
        overlay(image16.requires_grad_(), heat.half()),
        overlay(image16.float(), heat.half().float()),
    )


@pytest.mark.parametrize(
    "image",
    [
        np.full((6, 6, 3), 200, dtype=np.int64),  # np.array(pil_image).astype(int)
        np.full((6, 6, 3), 200 * 257, dtype=np.uint16),  # a 16-bit PNG
        np.full((6, 6), 3, dtype=np.int32),
        torch.full((6, 6, 3), 200, dtype=torch.int64),
        torch.full((6, 6), 200, dtype=torch.int16),
    ],
    ids=["int64", "uint16", "int32", "int64 tensor", "int16 tensor"],
)
def test_integer_images_other_than_uint8_are_refused_with_the_remedy(image):
    """They were taken for floats in [0, 1] and clipped: a white picture, silently."""
    for call, argument in [
        (lambda: to_uint8_rgb(image, "picture"), "`picture`"),
        (lambda: overlay(image, np.zeros(image.shape[:2])), "`image_01_hwc`"),
        (lambda: save_png(image, "never.png"), "`array`"),
    ]:
        with pytest.raises(TypeError, match=argument) as error:
            call()
        message = str(error.value)
        assert "uint8" in message and ".astype(np.uint8)" in message and "/ 65535" in message
        assert str(image.dtype).replace("torch.", "") in message


def test_integer_display_images_are_refused_before_anything_is_computed(two_digits, tmp_path):
    from captum_ext.viz import contrastive_section, voice_section

    model, images, shown = two_digits
    as_int = (shown * 255).round().long()
    for section in (contrastive_section, voice_section):
        with pytest.raises(TypeError, match="`display_images` has dtype int64"):
            section(model, BUNDLED_CAM_LAYER, images, as_int, None, tmp_path)
        with pytest.raises(TypeError, match="`display_images` has dtype uint16"):
            array = as_int.permute(0, 2, 3, 1).numpy().astype(np.uint16)
            section(model, BUNDLED_CAM_LAYER, images, array, None, tmp_path)
    assert not (tmp_path / "images").exists()


def test_boolean_images_are_black_and_white():
    mask = np.zeros((4, 5), dtype=bool)
    mask[1, 2] = True
    rgb = to_uint8_rgb(mask)
    assert rgb.dtype == np.uint8 and rgb[1, 2].tolist() == [255, 255, 255] and rgb.sum() == 765
    np.testing.assert_array_equal(to_uint8_rgb(torch.from_numpy(mask)), rgb)


def test_float_images_on_a_0_255_scale_warn_naming_the_argument(two_digits, tmp_path):
    image = np.full((4, 4, 3), 200.0)
    with pytest.warns(UserWarning, match=r"`picture` holds float values up to 200.*255") as caught:
        assert (to_uint8_rgb(image, "picture") == 255).all()
    assert all(w.filename == __file__ for w in caught)
    # rounding above 1 (a denormalisation) is not a 0..255 image
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        to_uint8_rgb(np.full((4, 4), 1.0 + 1e-6))
    # a section warns once for all its display images, at the user's line
    model, images, shown = two_digits
    data = compute_contrastive(model, BUNDLED_CAM_LAYER, images)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        render_contrastive(data, shown * 255, tmp_path)
    named = [w for w in caught if "`display_images` holds float values" in str(w.message)]
    assert len(named) == 1 and named[0].filename == __file__


# ---------------------------------------------------------------------------------------
# alpha and cmap


@pytest.mark.parametrize(
    "alpha",
    [
        np.float32(0.3),
        np.float64(0.3),
        np.array(0.3),
        torch.tensor(0.3),
        torch.tensor(0.3).double(),
    ],
    ids=["np.float32", "np.float64", "0-d array", "0-d tensor", "0-d double tensor"],
)
def test_alpha_may_be_any_real_number(alpha, tmp_path):
    image, heat = np.random.default_rng(0).random((5, 5, 3)), np.linspace(0, 1, 25).reshape(5, 5)
    np.testing.assert_array_equal(
        overlay(image, heat, alpha=alpha), overlay(image, heat, alpha=float(alpha))
    )
    assert save_colorbar(tmp_path / "bar.png", alpha=alpha).is_file()


@pytest.mark.parametrize(
    "alpha",
    [
        True,
        np.bool_(False),
        float("nan"),
        np.float32("nan"),
        1.5,
        -0.1,
        "0.5",
        None,
        torch.tensor([0.3]),
        np.array([0.3]),
        torch.tensor(True),
    ],
)
def test_alpha_refuses_what_is_not_a_number_in_0_1(alpha, tmp_path):
    with pytest.raises(ValueError, match=r"`alpha` must be a number in \[0, 1\]"):
        overlay(np.zeros((4, 4)), np.zeros((4, 4)), alpha=alpha)
    with pytest.raises(ValueError, match="`alpha`"):
        save_colorbar(tmp_path / "bar.png", alpha=alpha)


def _sections():
    from captum_ext.viz import (
        contrastive_section,
        explanation_metrics_section,
        report,
        trust,
        trust_section,
        uncertainty,
        voice_section,
    )

    return [
        (contrastive_section, report, "compute_contrastive", True),
        (voice_section, uncertainty, "compute_voice", True),
        (trust_section, trust, "compute_trust", True),
        (explanation_metrics_section, uncertainty, "compute_explanation_metrics", False),
    ]


@pytest.mark.parametrize("index", range(4), ids=["contrastive", "voice", "trust", "metrics"])
@pytest.mark.parametrize(
    ("option", "pattern"), [({"alpha": 1.5}, "`alpha`"), ({"cmap": "Inferno"}, "`cmap`")]
)
def test_sections_check_alpha_and_cmap_before_computing(
    index, option, pattern, two_digits, tmp_path, monkeypatch
):
    """They were checked only when drawing, after every map had been computed."""
    section, module, compute, takes_cmap = _sections()[index]
    if "cmap" in option and not takes_cmap:
        pytest.skip("the section has no cmap")

    def computed(*args, **kwargs):
        raise AssertionError("the maps were computed before the options were checked")

    monkeypatch.setattr(module, compute, computed)
    model, images, shown = two_digits
    with pytest.raises(ValueError, match=pattern):
        section(model, BUNDLED_CAM_LAYER, images, shown, None, tmp_path, **option)


# ---------------------------------------------------------------------------------------
# user text is drawn literally


@pytest.mark.parametrize("name", [DOLLARS, VALID_MATH])
def test_class_names_and_titles_with_dollars_are_drawn_as_given(name, tmp_path):
    from captum_ext.inversion import sample_grid
    from captum_ext.metrics import reliability_diagram

    grid = sample_grid(
        torch.rand(4, 1, 5, 5),
        torch.tensor([0, 0, 1, 1]),
        per_class=2,
        class_names=["cat", name],
        title=f"title {name}",
    )
    grid.savefig(tmp_path / "grid.png")  # mathtext failed here (pyparsing error)
    label = grid.axes[2].yaxis.label
    assert label.get_text() == name
    # drawn as the plain string: as wide as the same string in plain text of the same font
    # (valid mathtext, "a_$x^2$_b", was drawn as a_x²_b, narrower)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(grid).get_renderer()
    plain = grid.text(0, 0, name, fontproperties=label.get_fontproperties(), parse_math=False)
    assert label.get_window_extent(renderer).width == pytest.approx(
        plain.get_window_extent(renderer).width
    )
    assert grid.get_suptitle() == f"title {name}"
    probabilities = torch.tensor([[0.9, 0.1], [0.3, 0.7]])
    diagram = plot_reliability_diagram(
        reliability_diagram(probabilities, torch.tensor([0, 0]), n_bins=5), title=name
    )
    diagram.savefig(tmp_path / "diagram.png")
    assert diagram.axes[0].title.get_text().startswith(f"{name}, ECE = ")
    bar = save_colorbar(tmp_path / "bar.png", label=name, low=f"{name} low", high=f"{name} high")
    assert bar.is_file()


def test_colorbar_texts_are_drawn_as_given(monkeypatch, tmp_path):
    import importlib

    overlay_module = importlib.import_module("captum_ext.viz.overlay")  # not the function
    drawn = {}
    original = overlay_module.save_figure

    def spy(figure, path, **kwargs):
        result = original(figure, path, **kwargs)  # draws: the tick labels exist as drawn
        axis = figure.axes[0]
        drawn["label"] = axis.xaxis.label.get_text()
        drawn["ticks"] = [t.get_text() for t in axis.get_xticklabels()]
        return result

    monkeypatch.setattr(overlay_module, "save_figure", spy)
    save_colorbar(tmp_path / "bar.png", label=VALID_MATH, low=DOLLARS, high=VALID_MATH)
    assert drawn == {"label": VALID_MATH, "ticks": [DOLLARS, "0.5", VALID_MATH]}


def test_class_name_with_dollars_in_the_report_command(tmp_path):
    """`captum-ext report --classes` with a name holding two '$' failed with a pyparsing
    error (exit status 2)."""
    from captum_ext.cli import main

    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join([*map(str, range(9)), DOLLARS]) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    status = main(
        [
            "report",
            "--classes",
            str(classes),
            "--sections",
            "inversion",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert status == 0
    assert (out / "images" / "inversion" / "samples.png").is_file()


# ---------------------------------------------------------------------------------------
# the sample grid's class names


def _label_and_images(figure, row: int, columns: int = 2):
    """The drawn extent (pixels) of row ``row``'s name and of the first image's axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    label = figure.axes[row * columns].yaxis.label
    return (
        label.get_window_extent(renderer),
        figure.axes[0].get_window_extent(renderer),
        label.get_text(),
    )


@pytest.mark.parametrize("dpi", [80, 100, 150])
def test_long_class_names_end_left_of_the_images_and_start_inside_the_figure(dpi):
    """Names were horizontal y-labels in a fixed 0.5-inch margin: from 5 characters on they
    ran over the first column and were cut at the figure's edge."""
    from captum_ext.inversion import sample_grid

    names = ["six", "golden retriever", "seven", "W" * 24]
    figure = sample_grid(
        torch.rand(8, 1, 6, 6),
        torch.arange(4).repeat_interleave(2),
        per_class=2,
        class_names=names,
    )
    figure.set_dpi(dpi)
    right_edges = set()
    for row, name in enumerate(names):
        text, images, drawn = _label_and_images(figure, row)
        assert drawn == name
        assert text.x1 < images.x0, f"{name!r} runs over the images"
        assert text.x0 >= 0, f"{name!r} is cut at the figure's left edge"
        right_edges.add(round(text.x1, 3))
    assert len(right_edges) == 1  # right-aligned


def test_very_long_class_names_are_cut_and_the_figure_stays_bounded():
    from captum_ext.inversion import sample_grid

    def grid(name):
        return sample_grid(
            torch.rand(4, 1, 6, 6),
            torch.tensor([0, 0, 1, 1]),
            per_class=2,
            class_names=["a", name],
        )

    long, longer = grid("x" * 40), grid("x" * 400)
    assert long.get_size_inches()[0] == longer.get_size_inches()[0] < 6.0
    text, images, drawn = _label_and_images(longer, 1)
    assert drawn == "x" * 23 + "\u2026"
    assert 0 <= text.x0 and text.x1 < images.x0
    assert grid("x" * 24).axes[2].get_ylabel() == "x" * 24  # 24 characters: whole
    # short names keep the former 0.5-inch margin
    assert grid("b").get_size_inches()[0] == pytest.approx(0.5 + 0.8 * 2 + 0.1 + 1.1)


# ---------------------------------------------------------------------------------------
# legends: every OOD set, every method, under its own name


def _ood_data(names):
    g = torch.Generator().manual_seed(0)

    def scores(n, low, high):
        return (low + (high - low) * torch.rand(n, generator=g)).double()

    inside, *outside = names
    return OODData(
        kind="max_in",
        counts={name: 20 for name in names},
        garbage={name: 0.1 * i for i, name in enumerate(names)},
        scores={name: {"TIE": scores(20, 0.1 * i, 1.0)} for i, name in enumerate(names)},
        metrics={name: {"TIE": (0.8, 0.8, 0.5)} for name in outside},
        pool=None,
        pool_size=0,
        log={},
    )


def test_every_ood_set_has_a_legend_entry_under_its_own_name(tmp_path, monkeypatch):
    """matplotlib leaves labels starting with '_' out of a legend it collects itself."""
    import captum_ext.viz.ood as ood

    drawn = {}
    original = ood.save_figure

    def spy(figure, path, **kwargs):
        if path.name == "scores.png":
            legend = figure.axes[0].get_legend()
            drawn["legend"] = [t.get_text() for t in legend.get_texts()]
            drawn["curves"] = len(figure.axes[0].patches)
        return original(figure, path, **kwargs)

    monkeypatch.setattr(ood, "save_figure", spy)
    names = ["in-distribution", "_holdout", "noise", DOLLARS]
    render_ood(_ood_data(names), tmp_path)
    assert drawn == {"legend": names, "curves": 4}


def _evaluation_scores(methods):
    metrics = [
        "deletion AUC",
        "insertion AUC",
        "ROAD (MoRF)",
        "completeness",
        "class sensitivity",
        "randomisation",
    ]
    return EvaluationScores(
        methods=methods,
        n_images=1,
        scores={metric: {m: 0.5 for m in methods} for metric in metrics},
        road_percentages=torch.tensor([0.25, 0.5], dtype=torch.float64),
        road_curves={m: torch.tensor([0.9, 0.5], dtype=torch.float64) for m in methods},
        notes=[],
    )


def _drawn_road_legend(tmp_path, monkeypatch, methods: list[str]) -> list[str]:
    """The entries of the ROAD figure's legend that render_evaluation draws for ``methods``."""
    import captum_ext.viz._figures as figures

    drawn = {}
    original = figures.save_figure

    def spy(figure, path, **kwargs):
        drawn["legend"] = [t.get_text() for t in figure.axes[0].get_legend().get_texts()]
        return original(figure, path, **kwargs)

    monkeypatch.setattr(figures, "save_figure", spy)
    render_evaluation(_evaluation_scores(methods), tmp_path)
    return drawn["legend"]


def test_evaluation_legend_lists_every_method_as_given(tmp_path, monkeypatch):
    methods = ["Saliency", "_mine", DOLLARS]
    assert _drawn_road_legend(tmp_path, monkeypatch, methods) == methods


# ---------------------------------------------------------------------------------------
# the user's matplotlib state


def test_render_evaluation_leaves_the_backend_and_pyplot_alone(tmp_path, monkeypatch):
    """It called matplotlib.use("Agg") (switching the user's backend, and setting
    rcParams["backend_fallback"]) and drew with pyplot, leaving the figure open when the
    PNG could not be written."""
    import matplotlib.pyplot as plt

    def refuse(*args, **kwargs):
        raise AssertionError("matplotlib.use() was called")

    monkeypatch.setattr(matplotlib, "use", refuse)
    monkeypatch.setitem(matplotlib.rcParams, "backend_fallback", True)
    backend = matplotlib.get_backend()
    mine = plt.figure()
    try:
        open_before = plt.get_fignums()
        render_evaluation(_evaluation_scores(["A", "B"]), tmp_path / "ok")
        assert (tmp_path / "ok" / "images" / "evaluation" / "road.png").is_file()
        blocked = tmp_path / "blocked"
        blocked.mkdir()
        (blocked / "images").write_text("a file where the folder goes", encoding="utf-8")
        with pytest.raises(OSError):
            render_evaluation(_evaluation_scores(["A"]), blocked)
        assert plt.get_fignums() == open_before
        assert plt.gcf() is mine
        assert matplotlib.get_backend() == backend
        assert matplotlib.rcParams["backend_fallback"] is True
    finally:
        plt.close(mine)


def test_legends_keep_underscore_names_on_a_matplotlib_that_drops_them(tmp_path, monkeypatch):
    """matplotlib before 3.10 (the [viz] extra admits 3.6) leaves labels starting with "_"
    out of a legend even when they are passed explicitly: the report's legends are built
    with placeholder labels and then given the names, so every name is listed there too."""
    import matplotlib.axes

    original_legend = matplotlib.axes.Axes.legend

    def legend_before_3_10(self, handles, labels, **kwargs):  # as matplotlib 3.6-3.9 did
        kept = [(h, label) for h, label in zip(handles, labels) if not label.startswith("_")]
        return original_legend(self, [h for h, _ in kept], [label for _, label in kept], **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "legend", legend_before_3_10)
    methods = ["Saliency", "_mine", DOLLARS]
    assert _drawn_road_legend(tmp_path, monkeypatch, methods) == methods
