"""The report's introspection section: numbers tied to both stages, then the page."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from captum_ext.viz.build import SECTION_REGISTRY, ReportConfig, default_sections
from captum_ext.viz.introspection import (
    SHOWN_IMAGES,
    IntrospectionSummary,
    compute_introspection,
    introspection_section,
    render_introspection,
)


class _FixedNetwork:
    """Stage 1 = a fixed table of logits; stage 2 = fixed probabilities (a stand-in with the
    two things the section reads)."""

    def __init__(self, logits: torch.Tensor, intro: torch.Tensor) -> None:
        self.model = lambda x: logits[x[:, 0, 0, 0].long()]
        self.intro = intro

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return self.intro[x[:, 0, 0, 0].long()]


def _fixed_case():
    logits = torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0], [2.0, 0.0, 0.0]])
    intro = torch.tensor([[0.9, 0.05, 0.05], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8], [0.5, 0.4, 0.1]])
    images = torch.arange(4.0).reshape(4, 1, 1, 1).expand(4, 1, 2, 2).contiguous()
    return _FixedNetwork(logits, intro), images


def test_numbers_are_both_stages_and_disagreements_come_first():
    network, images = _fixed_case()
    summary = compute_introspection(network, images, labels=[0, 1, None, 0], batch_size=3)
    assert summary.feed_forward.tolist() == [0, 1, 2, 0]
    assert summary.introspective.tolist() == [0, 0, 2, 0]
    torch.testing.assert_close(
        summary.feed_forward_confidence, torch.softmax(network.model(images), 1).max(1).values
    )
    torch.testing.assert_close(summary.introspective_confidence, torch.tensor([0.9, 0.6, 0.8, 0.5]))
    assert summary.disagree.tolist() == [False, True, False, False]
    # the disagreement first, then by introspective confidence, lowest first
    assert summary.order.tolist() == [1, 3, 2, 0]
    assert summary.labels.tolist() == [0, 1, -1, 0]


def test_bundled_network_numbers_tie_to_predict(bundled_model, bundled_digits):
    from captum_ext.bundled import load_bundled_introspective_network

    images, labels = bundled_digits
    network = load_bundled_introspective_network(bundled_model)
    summary = compute_introspection(network, images, labels=labels)
    assert summary.introspective.tolist() == network.predict(images).tolist()
    with torch.no_grad():
        assert summary.feed_forward.tolist() == bundled_model(images).argmax(1).tolist()


def test_render_writes_the_table_and_the_first_images(tmp_path, monkeypatch):
    network, images = _fixed_case()
    summary = compute_introspection(network, images, labels=[0, 1, None, 0])
    section = render_introspection(
        summary, np.zeros((4, 2, 2, 3)), tmp_path, class_names=["a", "b", "c"]
    )
    summary_row, *image_rows = section.rows
    assert summary_row.table.rows[1] == ["accuracy (labelled images)", "1.000", "0.667"]
    assert len(image_rows) == min(4, SHOWN_IMAGES)
    assert image_rows[0].label.startswith("#1: feed-forward b") and "they disagree" in (
        image_rows[0].label
    )
    assert "disagree on 1 of 4 images" in section.intro
    assert "are pictured" not in section.intro  # every image is
    assert (tmp_path / "images" / "introspection" / "00001_input.png").is_file()


def test_the_intro_says_how_many_images_are_pictured(tmp_path):
    """With more images than are pictured the intro said the disagreeing images "come first
    below" without saying that only the first 12 are there."""
    n = SHOWN_IMAGES + 3
    logits = torch.eye(3)[torch.arange(n) % 3] * 2
    network = _FixedNetwork(logits, torch.softmax(logits, 1))
    images = torch.arange(float(n)).reshape(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    summary = compute_introspection(network, images)
    section = render_introspection(summary, np.zeros((n, 2, 2, 3)), tmp_path)
    assert f"(the first {SHOWN_IMAGES} of the {n} are pictured)" in section.intro
    assert len(section.rows) - 1 == SHOWN_IMAGES


def test_section_is_registered_asked_for_by_name_and_needs_a_head_for_your_model(tmp_path, capsys):
    from captum_ext.bundled import load_bundled_introspective_network
    from captum_ext.cli import main

    assert "introspection" in SECTION_REGISTRY
    assert "introspection" not in default_sections(ReportConfig())
    argv = ["report", "--model", "captum_ext.bundled:load_bundled_model", "--limit", "3"]
    argv += ["--no-progress", "--layer", "features.7", "--sections", "introspection"]
    assert main(argv + ["--out", str(tmp_path / "a")]) == 2
    assert "needs `--introspection-head`" in capsys.readouterr().err
    head = load_bundled_introspective_network().save(tmp_path / "head.pt")
    code = main(argv + ["--out", str(tmp_path / "b"), "--introspection-head", str(head)])
    assert code == 0, capsys.readouterr().err
    html = (tmp_path / "b" / "index.html").read_text(encoding="utf-8")
    assert "Does the network agree with itself?" in html and "disagree on" in html


class _NotToBeRun:
    """A network the section must not run: its arguments are wrong."""

    def model(self, x):
        raise AssertionError("the network ran before the arguments were checked")

    predict_proba = model


@pytest.mark.parametrize(
    ("arguments", "pattern"),
    [
        ({"names": ["a", "b"]}, "`names` has 2 entries for 4 images"),
        ({"labels": [0, 1, 2]}, "`labels` has 3 entries for 4 images"),
        ({"labels": torch.tensor([0, 1])}, "`labels` has 2 entries for 4 images"),
        ({"display_images": np.zeros((2, 2, 2, 3))}, "`display_images` must hold 4 images"),
        ({"display_images": np.zeros((4, 2, 2), np.int64)}, "`display_images` has dtype int64"),
        ({"batch_size": 0}, "batch-size"),
    ],
)
def test_section_checks_its_arguments_before_running_the_network(arguments, pattern, tmp_path):
    """Wrong lengths gave an IndexError from the middle of the drawing (or a wrong page)."""
    _, images = _fixed_case()
    call = {"display_images": np.zeros((4, 2, 2, 3)), "class_names": None, **arguments}
    display, class_names = call.pop("display_images"), call.pop("class_names")
    with pytest.raises((ValueError, TypeError), match=pattern):
        introspection_section(_NotToBeRun(), images, display, class_names, tmp_path, **call)
    assert not (tmp_path / "images").exists()


@pytest.mark.parametrize(
    ("arguments", "pattern"),
    [
        ({"class_names": ["a", "b"]}, r"`class_names` \(--classes\) has 2 names .* 3 outputs"),
        ({"class_names": list("abcd")}, r"`class_names` \(--classes\) has 4 names .* 3 outputs"),
        ({"labels": [0, 3, None, 1]}, r"`labels`\[1\]=3 is not a class index .* \(0..2\)"),
        ({"labels": [0, -1, None, 1]}, r"`labels`\[1\]=-1 is not a class index"),
    ],
)
def test_section_checks_class_names_and_labels_against_the_network(arguments, pattern, tmp_path):
    network, images = _fixed_case()
    call = {"class_names": None, **arguments}
    class_names = call.pop("class_names")
    with pytest.raises(ValueError, match=pattern):
        introspection_section(
            network, images, np.zeros((4, 2, 2, 3)), class_names, tmp_path, **call
        )


def test_render_checks_names_and_class_names(tmp_path):
    network, images = _fixed_case()
    summary = compute_introspection(network, images, labels=[0, 1, None, 0])
    assert summary.num_classes == 3
    shown = np.zeros((4, 2, 2, 3))
    with pytest.raises(ValueError, match="`names` has 3 entries for 4 images"):
        render_introspection(summary, shown, tmp_path, names=["a", "b", "c"])
    with pytest.raises(ValueError, match="`class_names`"):
        render_introspection(summary, shown, tmp_path, class_names=["a", "b"])
    # a summary built by hand (no num_classes): the names must cover the classes it shows
    by_hand = IntrospectionSummary(
        *[
            getattr(summary, f)
            for f in (
                "feed_forward",
                "feed_forward_confidence",
                "introspective",
                "introspective_confidence",
                "order",
            )
        ]
    )
    with pytest.raises(ValueError, match="`class_names` .* 2 names .* up to class 2"):
        render_introspection(by_hand, shown, tmp_path, class_names=["a", "b"])
    section = render_introspection(by_hand, shown, tmp_path, names=list("pqrs"))
    assert section.rows[1].label.startswith("q: feed-forward 1 ")


@pytest.mark.cuda
def test_a_cuda_network_takes_cpu_images(bundled_model, bundled_digits):
    import copy

    from captum_ext.bundled import load_bundled_introspective_network

    images, _ = bundled_digits
    network = load_bundled_introspective_network(copy.deepcopy(bundled_model).cuda())
    summary = compute_introspection(network, images)
    assert not summary.introspective.is_cuda
    expected = load_bundled_introspective_network(bundled_model).predict(images)
    assert summary.introspective.tolist() == expected.tolist()
