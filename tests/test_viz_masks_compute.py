"""captum_ext.viz.masks: compute_minimal_mask (numbers, no drawing) and render_minimal_mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from captum_ext.attr import ActivationMatchingMask
from captum_ext.circuits import CircuitReadout, compare
from captum_ext.data import DIGIT_CLASSES, denormalize_digits, load_sample_digits
from captum_ext.viz.masks import (
    MinimalMaskData,
    compute_minimal_mask,
    minimal_mask_section,
    render_minimal_mask,
)

matplotlib = pytest.importorskip("matplotlib")
LAYERS = ["features.1", "features.4", "features.7"]


@pytest.fixture(scope="module")
def explainer(bundled_model):
    images, _ = load_sample_digits()
    fitted = ActivationMatchingMask(bundled_model, LAYERS)
    fitted.fit(DataLoader(TensorDataset(images), batch_size=20), epochs=1, progress=False)
    return fitted


@pytest.fixture(scope="module")
def images():
    return load_sample_digits()[0][:3]


def test_compute_draws_nothing_and_its_numbers_are_the_explainers(
    bundled_model, explainer, images, no_drawing
):
    data = compute_minimal_mask(
        bundled_model, images, explainer=explainer, circuit_rows=2, seed=3, batch_size=2
    )
    assert isinstance(data, MinimalMaskData)
    # two batches, seeded seed + start: the same as two direct calls
    first = explainer.attribute(images[:2], seed=3, return_details=True, progress=False)
    second = explainer.attribute(images[2:], seed=5, return_details=True, progress=False)

    def both(name):
        return torch.cat([getattr(first, name), getattr(second, name)]).float().numpy()

    np.testing.assert_array_equal(data.mask, both("mask")[:, 0])
    np.testing.assert_allclose(data.active, both("active_fraction"))
    np.testing.assert_array_equal(data.agreement, both("agreement") > 0.5)
    np.testing.assert_allclose(data.confidence, both("confidence"))
    np.testing.assert_allclose(data.kept_confidence, both("explanation_confidence"))
    np.testing.assert_allclose(data.sufficiency, both("sufficiency"))
    np.testing.assert_allclose(data.necessity, both("necessity"))
    assert data.target == torch.cat([first.target, second.target]).tolist()
    assert data.class_names == [str(k) for k in range(10)] and data.mode == "amortised"
    # the circuits of the first two images, and what they share
    assert sorted(data.circuits) == sorted(data.comparisons) == [0, 1]
    readout = CircuitReadout(bundled_model)
    graphs_x = readout.readout(images[:2], target=first.target)
    graphs_e = readout.readout(first.explanation, target=first.target)
    for i in range(2):
        expected = compare(graphs_x[i], graphs_e[i])
        assert data.comparisons[i].edge_jaccard == pytest.approx(expected.edge_jaccard)
        assert data.comparisons[i].node_jaccard == pytest.approx(expected.node_jaccard)
        assert data.comparisons[i].flow_retained == pytest.approx(expected.flow_retained)


def test_render_gives_the_sections_page(bundled_model, explainer, images, tmp_path):
    labels = [0, None, 3]
    section = minimal_mask_section(
        bundled_model,
        images,
        denormalize_digits(images),
        DIGIT_CLASSES,
        tmp_path / "a",
        progress=False,
        explainer=explainer,
        labels=labels,
        circuit_rows=1,
        seed=1,
    )
    data = compute_minimal_mask(
        bundled_model,
        images,
        explainer=explainer,
        class_names=DIGIT_CLASSES,
        circuit_rows=1,
        seed=1,
    )
    rendered = render_minimal_mask(data, denormalize_digits(images), tmp_path / "b", labels=labels)
    assert rendered.title == section.title and rendered.intro == section.intro
    assert [r.label for r in rendered.rows] == [r.label for r in section.rows]
    assert [r.table and r.table.rows for r in rendered.rows] == [
        r.table and r.table.rows for r in section.rows
    ]
    assert [[f.caption for f in r.figures] for r in rendered.rows] == [
        [f.caption for f in r.figures] for r in section.rows
    ]
    assert all(
        str(f.path).startswith(str(tmp_path / "b")) for r in rendered.rows for f in r.figures
    )


def test_compute_checks_its_arguments(bundled_model, explainer, images):
    with pytest.raises(ValueError, match="`mode`='fast'"):
        compute_minimal_mask(bundled_model, images, explainer=explainer, mode="fast")
    with pytest.raises(TypeError, match="`explainer` must be an ActivationMatchingMask"):
        compute_minimal_mask(bundled_model, images, explainer="nope")
    with pytest.raises(ValueError, match="`class_names`"):
        compute_minimal_mask(bundled_model, images, explainer=explainer, class_names=["a"])


def test_a_network_the_circuit_readout_cannot_follow_still_gets_its_masks(
    bundled_model, explainer, images, tmp_path, monkeypatch, no_drawing
):
    """The automatic CircuitReadout refuses attention layers (a ViT): the masks and their
    read-outs still come, and the section says why no circuit is drawn. A readout the
    caller passed keeps its error."""
    import captum_ext.circuits as circuits

    class Refusing(CircuitReadout):
        def readout(self, *args, **kwargs):
            raise ValueError("`layers`: cannot follow attention.\nmore")

    monkeypatch.setattr(circuits, "CircuitReadout", Refusing)
    data = compute_minimal_mask(bundled_model, images, explainer=explainer, circuit_rows=2, seed=3)
    plain = explainer.attribute(images, seed=3, return_details=True, progress=False)
    np.testing.assert_array_equal(data.mask, plain.mask[:, 0].float().numpy())
    assert data.circuits == {} and data.comparisons == {}
    assert data.circuit_problem == "`layers`: cannot follow attention."
    shown = denormalize_digits(images).permute(0, 2, 3, 1).numpy()
    section = render_minimal_mask(data, shown, tmp_path)
    assert section.intro.endswith(
        "No circuits are drawn: the circuit readout cannot follow this network "
        "(`layers`: cannot follow attention)."
    )
    with pytest.raises(ValueError, match="cannot follow attention"):
        compute_minimal_mask(
            bundled_model, images, explainer=explainer, circuit=Refusing(bundled_model)
        )
