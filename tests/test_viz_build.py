"""``captum_ext.viz.build`` (the report's registry, SectionInputs, build_report) and
``captum_ext.data.loading.resolve_inputs`` (the one input path of the command line)."""

from __future__ import annotations

import argparse
import dataclasses
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captum_ext.data.loading import ResolvedInputs, folder_labels, resolve_inputs
from captum_ext.viz import build
from captum_ext.viz.build import (
    SECTION_REGISTRY,
    USER_MODEL_SECTIONS,
    ReportConfig,
    SectionSpec,
    build_report,
    build_section_inputs,
)


def _folder(tmp_path, layout: dict[str, int], size=(20, 16), mode="RGB"):
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for sub, count in layout.items():
        folder = root / sub if sub else root
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            channels = 3 if mode == "RGB" else 1
            pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
            Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(
                folder / f"{sub or 'top'}{i}.png"
            )
    return root


# ------------------------------------------------------------------ registry


def test_every_registered_section_has_a_description_and_a_build():
    assert list(SECTION_REGISTRY) == [
        "contrastive",
        "voice",
        "metrics",
        "trust",
        "masks",
        "inversion",
        "introspection",
        "evaluation",
    ]
    for name, spec in SECTION_REGISTRY.items():
        assert isinstance(spec, SectionSpec)
        assert isinstance(spec.description, str) and spec.description.strip(), name
        assert callable(spec.build), name
        for field in spec.options.values():  # options come from real config fields
            assert hasattr(ReportConfig(), field), (name, field)
    assert set(USER_MODEL_SECTIONS) <= set(SECTION_REGISTRY)


def test_cli_sections_help_lists_exactly_the_registry(capsys):
    from captum_ext import cli

    assert cli.SECTIONS == tuple(SECTION_REGISTRY)
    assert cli.SECTION_DESCRIPTIONS == {n: s.description for n, s in SECTION_REGISTRY.items()}
    parser = cli.build_parser()
    report = next(
        a
        for a in parser._subparsers._group_actions[0].choices["report"]._actions
        if "--sections" in a.option_strings
    )
    listed = report.help.split("from: ", 1)[1].split(" (described above)")[0].split(", ")
    assert listed == list(SECTION_REGISTRY)
    with pytest.raises(argparse.ArgumentTypeError, match="unknown section 'nope'"):
        cli._sections("contrastive,nope")


def test_adding_a_section_is_one_registry_entry(tmp_path, monkeypatch):
    from captum_ext.viz import Section

    seen = {}

    def build_counts(inputs, config, asked):
        seen["inputs"] = inputs
        section = Section("Counted", intro=f"{inputs.images.shape[0]} images")
        section.add_row("all", [])
        return section

    registry = dict(SECTION_REGISTRY, counted=SectionSpec("counts the images", build_counts))
    monkeypatch.setattr(build, "SECTION_REGISTRY", registry)
    out = tmp_path / "out"
    result = build_report(ReportConfig(limit=3, sections=["counted"], out=out, progress=False))
    assert result.index == out / "index.html" and result.index.is_file()
    assert [name for name, _ in result.timings] == ["counted", "(writing the page)"]
    assert "3 images" in result.index.read_text(encoding="utf-8")
    assert seen["inputs"].images.shape[0] == 3


def test_unknown_sections_name_the_option(tmp_path):
    with pytest.raises(ValueError, match="--sections"):
        build_report(ReportConfig(sections=["nope"], out=tmp_path / "o"))


# ------------------------------------------------------------------ SectionInputs


def test_section_inputs_compute_predictions_once_and_correctly(tmp_path):
    from captum_ext.bundled import load_bundled_model
    from captum_ext.data import BUNDLED_CAM_LAYER, load_sample_digits

    config = ReportConfig(limit=5, out=tmp_path / "o", batch_size=2, progress=False)
    inputs, metadata = build_section_inputs(config, ["contrastive"])
    images, labels = load_sample_digits()
    model = load_bundled_model()
    with torch.no_grad():
        expected = torch.softmax(model(images[:5]), dim=1)
    torch.testing.assert_close(inputs.probabilities, expected, rtol=1e-5, atol=1e-6)
    assert inputs.predictions.tolist() == expected.argmax(1).tolist()
    assert inputs.labels == labels[:5].tolist()
    assert inputs.layer_name == BUNDLED_CAM_LAYER and inputs.transform == "digits"
    assert inputs.display_images.shape[0] == 5
    assert metadata["Images"] == "5 bundled sample digits"
    with pytest.raises(dataclasses.FrozenInstanceError):
        inputs.batch_size = 3


# ------------------------------------------------------------------ resolve_inputs


def test_folder_labels_one_rule():
    assert folder_labels(["cat", "dog", "7", "1", ""], ["cat", "dog"]) == [0, 1, -1, 1, -1]
    assert folder_labels(["3", "x", ""], None) == [3, -1, -1]


def test_resolve_inputs_labels_from_folder_names(tmp_path):
    root = _folder(tmp_path, {"cat": 2, "dog": 1, "": 1, "other": 1})
    inputs = resolve_inputs(root, transform="imagenet", class_names=["dog", "cat"])
    assert isinstance(inputs, ResolvedInputs)
    assert inputs.images.shape == (5, 3, 224, 224)
    assert inputs.names == [
        "cat/cat0.png",
        "cat/cat1.png",
        "dog/dog0.png",
        "other/other0.png",
        "top0.png",
    ]
    assert inputs.labels.tolist() == [1, 1, 0, -1, -1]
    assert inputs.label_list() == [1, 1, 0, None, None]
    assert inputs.description == f"5 images from {root}"


def test_resolve_inputs_transform_mapping(tmp_path):
    root = _folder(tmp_path, {"2": 2}, size=(20, 16))
    plain = resolve_inputs(root, transform="none")
    assert plain.images.shape == (2, 3, 16, 20) and plain.transform == "none"
    assert 0.0 <= plain.images.min() and plain.images.max() <= 1.0
    assert plain.labels.tolist() == [2, 2]  # a class index folder, no class names
    digits = resolve_inputs(root, default_transform="digits")
    assert digits.images.shape == (2, 1, 28, 28) and digits.transform == "digits"
    assert resolve_inputs(root).transform == "imagenet"
    assert resolve_inputs(root, limit=1).images.shape[0] == 1


def test_resolve_inputs_bundled_default():
    inputs = resolve_inputs(limit=4)
    assert inputs.images.shape == (4, 1, 28, 28) and inputs.transform == "digits"
    assert inputs.names[0] == "sample digit 0" and inputs.labels.dtype == torch.int64


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"transform": "imagenet"}, "`transform`"),
        ({"limit": 0}, "`limit`"),
        ({"limit": True}, "`limit`"),
    ],
)
def test_resolve_inputs_bad_arguments_name_them(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        resolve_inputs(**kwargs)


def test_resolve_inputs_missing_or_empty_folder_names_images(tmp_path):
    with pytest.raises(FileNotFoundError, match="`images`"):
        resolve_inputs(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="`images`"):
        resolve_inputs(tmp_path / "empty")


# ------------------------------------------------------------------ deprecation shims


@pytest.mark.parametrize(
    "old, new",
    [
        ("_check_output", build.check_output),
        ("_format_timings", build.format_timings),
        ("_OutputError", build.OutputError),
        ("_pick_layer", build.pick_layer),
    ],
)
def test_private_cli_names_moved_warn_and_work(old, new):
    from captum_ext import cli

    with pytest.warns(DeprecationWarning, match="captum_ext.viz.build"):
        assert getattr(cli, old) is new


def test_loading_parse_device_moved_warns_and_works():
    from captum_ext.data import loading

    with pytest.warns(DeprecationWarning, match="parse_device"):
        parse = loading._parse_device
    assert parse("cpu") == torch.device("cpu")


# ------------------------------------------------------------------ compute / render


def test_compute_contrastive_numbers_tie_to_their_definition():
    from captum_ext.attr import ContrastCAM, FinerCAM, GradCAM
    from captum_ext.attr.finer_cam import comparison_classes
    from captum_ext.bundled import load_bundled_model
    from captum_ext.data import BUNDLED_CAM_LAYER, load_sample_digits
    from captum_ext.viz import ContrastiveMaps, compute_contrastive

    model = load_bundled_model()
    images = load_sample_digits()[0][:5]
    data = compute_contrastive(model, BUNDLED_CAM_LAYER, images, batch_size=2)
    assert isinstance(data, ContrastiveMaps)
    with torch.no_grad():
        probabilities = torch.softmax(model(images), dim=1)
    torch.testing.assert_close(data.probabilities, probabilities, rtol=1e-5, atol=1e-6)
    top = probabilities.topk(2, dim=1).indices
    assert data.predicted.tolist() == top[:, 0].tolist()
    assert data.runner_up.tolist() == top[:, 1].tolist()
    layer = dict(model.named_modules())[BUNDLED_CAM_LAYER]
    gradcam = GradCAM(model, layer).attribute(
        images, target=top[:, 0], upsample_to_input=True, normalize="minmax"
    )
    contrast = ContrastCAM(model, layer).attribute(
        images, contrast=top[:, 1], upsample_to_input=True, normalize="minmax"
    )
    np.testing.assert_allclose(data.maps["gradcam"], gradcam[:, 0].detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(data.maps["contrast"], contrast[:, 0].detach().numpy(), atol=1e-5)
    with torch.no_grad():
        logits = model(images)
    assert data.compared.tolist() == comparison_classes(logits).tolist()
    for i in range(5):  # the three classes with the logits closest to P's
        gaps = (logits[i] - logits[i, top[i, 0]]).abs()
        gaps[top[i, 0]] = float("inf")
        assert set(data.compared[i].tolist()) == set(gaps.topk(3, largest=False).indices.tolist())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # confident digits: maps may vanish
        finer = FinerCAM(model, layer).attribute(
            images, target=top[:, 0], upsample_to_input=True, normalize="minmax"
        )
    np.testing.assert_allclose(data.maps["finer"], finer[:, 0].detach().numpy(), atol=1e-5)
    assert set(data.maps) == {"gradcam", "contrast", "counterfactual", "finer"}
    for heat in data.maps.values():
        assert heat.shape == (5, 28, 28) and heat.min() >= 0 and heat.max() <= 1
    assert data.class_names == [str(i) for i in range(10)]
    assert data.layer_name == BUNDLED_CAM_LAYER


def test_render_contrastive_draws_one_row_per_image(tmp_path):
    from captum_ext.viz import ContrastiveMaps, render_contrastive

    maps = {
        k: np.random.default_rng(0).random((2, 8, 8))
        for k in ("gradcam", "contrast", "counterfactual")
    }
    maps["contrast"][1] = 0.0
    data = ContrastiveMaps(
        probabilities=torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]]),
        predicted=torch.tensor([0, 2]),
        runner_up=torch.tensor([1, 1]),
        maps=maps,
        class_names=["a", "b", "c"],
        layer_name="conv",
    )
    section = render_contrastive(data, np.zeros((2, 8, 8, 3)), tmp_path, labels=[0, None])
    assert len(section.rows) == 3  # colour scale + one per image
    assert (
        "predicted a (70.0%), runner-up b (20.0%); true class a (correct)" in section.rows[1].label
    )
    captions = [f.caption for f in section.rows[2].figures]
    assert captions[2] == "ContrastCAM: Why c, rather than b? (empty)"
    assert len(captions) == 4  # input + the three maps given: a kind left out is not drawn
    assert all(Path(f.path).is_file() for f in section.rows[2].figures)


def test_render_contrastive_names_finer_cams_look_alikes(tmp_path):
    from captum_ext.viz import ContrastiveMaps, render_contrastive

    rng = np.random.default_rng(1)
    maps = {k: rng.random((2, 8, 8)) for k in ("gradcam", "contrast", "counterfactual", "finer")}
    maps["finer"][0] = 0.0
    data = ContrastiveMaps(
        probabilities=torch.tensor([[0.7, 0.2, 0.05, 0.05], [0.1, 0.3, 0.5, 0.1]]),
        predicted=torch.tensor([0, 2]),
        runner_up=torch.tensor([1, 1]),
        maps=maps,
        class_names=["a", "b", "c", "d"],
        layer_name="conv",
        compared=torch.tensor([[1, 3, 2], [1, 3, 0]]),
    )
    section = render_contrastive(data, np.zeros((2, 8, 8, 3)), tmp_path)
    first = [f.caption for f in section.rows[1].figures]
    second = [f.caption for f in section.rows[2].figures]
    assert first[4] == "Finer-CAM: What sets a apart from b, d, c? (empty)"
    assert second[4] == "Finer-CAM: What sets c apart from b, d, a?"
    assert "four maps" in section.intro and "look-alikes" in section.intro


def test_the_inversion_generator_of_a_digits_model_spans_the_digits_range():
    """--transform digits: normalize_digits reads 0..255 pixels; given the generator's [0, 1]
    pixels it made every image a near-constant (-0.42 +- 0.01) that the classifier saw as
    one class (a ViT trained on digits: 10 % label consistency after 300 or 1,500 steps;
    98.8 % with the right range)."""
    from captum_ext.bundled import load_bundled_model
    from captum_ext.data import normalize_digits
    from captum_ext.inversion import NetworkInversion
    from captum_ext.viz.build import _pixel_maps

    preprocess, value_range, denormalize = _pixel_maps("digits")
    assert preprocess is normalize_digits and value_range == (0.0, 255.0)
    inversion = NetworkInversion(
        load_bundled_model(), input_shape=(1, 28, 28), preprocess=preprocess,
        value_range=value_range, batch_size=8, seed=0,
    )  # fmt: skip
    # the generator's pixels in [0, 1] reach the model as the digits' whole normalised range
    ends = inversion.generator.preprocess_pixels(torch.tensor([0.0, 1.0]).view(2, 1, 1, 1))
    expected = normalize_digits(torch.tensor([0.0, 255.0]).view(2, 1, 1, 1))
    torch.testing.assert_close(ends, expected)
    assert float(expected[1] - expected[0]) > 3.0  # before: 0.0127 (1 / 255 / 0.3081)
    torch.testing.assert_close(denormalize(ends), torch.tensor([0.0, 1.0]).view(2, 1, 1, 1))
