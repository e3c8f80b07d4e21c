"""Finer-CAM: against pytorch-grad-cam's FinerCAM, against float64 autograd, batched."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from _helpers import (
    assert_model_unchanged,
    finer_scores_by_full_orderings,
    make_tiny_cnn,
    model_snapshot,
)

from captum_ext.attr import FinerCAM, GradCAM
from captum_ext.attr.finer_cam import finer_scores

LAYER = "features.3"


def test_equals_pytorch_grad_cam_finer_cam():
    """Independent peer on the same model and input (the layer keeps the input's size, so
    no resizing differs); the peer min-max normalises each map."""
    peer_module = pytest.importorskip("pytorch_grad_cam")
    model = make_tiny_cnn(dtype=torch.float32)
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(3))
    for alpha in (1.0, 0.6):
        with peer_module.FinerCAM(model=model, target_layers=[model.features[3]]) as peer:
            theirs = peer(input_tensor=x, alpha=alpha)
        ours = FinerCAM(model, LAYER, alpha=alpha).attribute(
            x, upsample_to_input=True, normalize="minmax"
        )
        np.testing.assert_allclose(ours[:, 0].detach().numpy(), theirs, atol=1e-5)


def test_scores_follow_their_definition():
    logits = torch.tensor([[4.0, 3.9, 1.0, 3.5, -2.0]], dtype=torch.float64)
    p = logits.softmax(dim=1)[0]
    y = logits[0]
    # class 0: nearest by |y_j - y_0| are 1 (0.1), 3 (0.5), 2 (3.0)
    expected = sum(p[j] * (y[0] - y[j]) for j in (1, 3, 2)) / (p[1] + p[3] + p[2] + 1e-9)
    assert finer_scores(logits, 1.0, (1, 2, 3))[0, 0].item() == pytest.approx(expected.item())


@pytest.mark.parametrize("batch", [1, 4, 5])
def test_maps_are_grad_cam_of_the_finer_score_in_float64(batch):
    """Autograd of s_P through the layer, in float64, with the Grad-CAM formula by hand."""
    model = make_tiny_cnn(dtype=torch.float64)
    x = torch.randn(batch, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    before = model_snapshot(model)
    target = torch.arange(batch) % 5
    ours = FinerCAM(model, LAYER, alpha=0.8).attribute(x, target=target)
    assert_model_unchanged(model, before)

    captured = {}
    handle = model.features[3].register_forward_hook(lambda m, i, o: captured.update(a=o))
    try:
        logits = model(x)
    finally:
        handle.remove()
    scores = finer_scores(logits, 0.8, (1, 2, 3)).gather(1, target[:, None]).sum()
    (gradients,) = torch.autograd.grad(scores, captured["a"])
    weights = gradients.mean(dim=(2, 3), keepdim=True)
    expected = torch.relu((weights * captured["a"]).sum(dim=1, keepdim=True)).detach()
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)


def test_finer_cam_differs_from_grad_cam():
    model = make_tiny_cnn(dtype=torch.float64)
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    finer = FinerCAM(model, LAYER).attribute(x)
    grad = GradCAM(model, LAYER).attribute(x)
    assert not torch.allclose(finer, grad)


def test_bad_arguments_name_themselves():
    model = make_tiny_cnn(dtype=torch.float32)
    with pytest.raises(ValueError, match="comparison_positions"):
        FinerCAM(model, LAYER, comparison_positions=())
    with pytest.raises(ValueError, match="comparison_positions"):
        FinerCAM(model, LAYER, comparison_positions=(0, -1))
    with pytest.raises(ValueError, match="alpha"):
        FinerCAM(model, LAYER, alpha=float("nan"))
    x = torch.randn(2, 3, 6, 6)
    with pytest.raises(ValueError, match="comparison_positions"):
        FinerCAM(model, LAYER, comparison_positions=(1, 9)).attribute(x)


def test_confident_predictions_warn_that_their_maps_vanish():
    """On the bundled model with logits x30 (median top-2 gap ~290) the comparison classes'
    probabilities underflow: the maps are zero, and the user is told so."""
    from _helpers import make_confident_model

    from captum_ext.data import load_sample_digits

    images, _ = load_sample_digits()
    model = make_confident_model(30.0)
    with pytest.warns(RuntimeWarning, match="FinerCAM: for .* examples"):
        maps = FinerCAM(model, "features.7").attribute(images[:4])
    assert float(maps.abs().max()) == 0.0
    plain = make_confident_model(1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        FinerCAM(plain, "features.7").attribute(images[:4])


def test_half_precision_model_gives_finite_maps_close_to_float32():
    """The bundled model in float16: the score is computed in float32 (in float16 the 1e-9
    guard is 0, and the underflowing weights of confident digits gave 0 / 0, NaN maps for
    7 of 8 digits); the maps match the float32 model's to half precision."""
    import copy

    from captum_ext.bundled import load_bundled_model
    from captum_ext.data import load_sample_digits

    images, labels = load_sample_digits()
    images, labels = images[:8], labels[:8]
    model = load_bundled_model().eval()
    half = copy.deepcopy(model).half()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the vanishing-map warning
        reference = FinerCAM(model, "features.6").attribute(images, target=labels)
        maps = FinerCAM(half, "features.6").attribute(images.half(), target=labels)
    assert maps.dtype == torch.float16
    assert bool(torch.isfinite(maps).all())
    assert float(reference.abs().max()) > 0.1
    torch.testing.assert_close(maps.float(), reference, atol=2e-3, rtol=0)


def test_an_unlikely_target_warns_that_its_map_vanishes(bundled_model, sample_digits):
    """The vanishing-map warning looked at the prediction's comparison classes only: a target
    the model finds unlikely (its look-alikes' summed probability below 1e-7, next to the
    formula's 1e-9 guard) gave maps orders of magnitude smaller than the prediction's
    without a word. The warning now checks the classes explained, also through VOICE."""
    from captum_ext.attr import VOICE
    from captum_ext.attr.finer_cam import comparison_classes

    x = sample_digits[0]
    logits = bundled_model(x).detach()
    probability = logits.softmax(1)
    predicted, unlikely = logits.argmax(dim=1), logits.argmin(dim=1)
    weight_predicted = probability.gather(1, comparison_classes(logits, predicted)).sum(1)
    weight_unlikely = probability.gather(1, comparison_classes(logits, unlikely)).sum(1)
    # digits whose prediction has look-alikes but whose least likely class has none
    rows = ((weight_predicted >= 1e-7) & (weight_unlikely < 1e-7)).nonzero().flatten()[:4]
    assert len(rows) == 4
    x, predicted, unlikely = x[rows], predicted[rows], unlikely[rows]
    with pytest.warns(RuntimeWarning, match="FinerCAM: for 4 of 4 examples"):
        FinerCAM(bundled_model, "features.7").attribute(x, target=unlikely)
    with pytest.warns(RuntimeWarning, match="FinerCAM: for 4 of 4 examples"):
        VOICE(FinerCAM(bundled_model, "features.7")).attribute(x, target=unlikely)
    with warnings.catch_warnings():  # the prediction's look-alikes: no warning
        warnings.simplefilter("error", RuntimeWarning)
        FinerCAM(bundled_model, "features.7").attribute(x, target=predicted)


@pytest.mark.parametrize("chunk", [1, 7, 2**22])
def test_scores_equal_the_full_orderings_with_ties_and_in_chunks(monkeypatch, chunk):
    """finer_scores sorted all C classes for each of the C classes (N x C x C: 1.9 GB per
    image at 21,843 classes, and a batched backward through it per contrast chunk: VOICE of
    FinerCAM took 46 s against 1.1 s for Grad-CAM at 1,000 classes). It now keeps each
    class's nearest few; the scores and their gradients are the same, ties included."""
    import captum_ext.attr.finer_cam as finer_module

    monkeypatch.setattr(finer_module, "_CHUNK_ELEMENTS", chunk)
    generator = torch.Generator().manual_seed(0)
    for trial in range(60):
        n, classes = 1 + trial % 3, 2 + (7 * trial) % 30
        if trial % 2:  # integer logits: many exact ties
            logits = torch.randint(0, 4, (n, classes), generator=generator).double()
        else:
            logits = torch.randn(n, classes, generator=generator, dtype=torch.float64)
        positions = [p for p in (1, 2, 3, 5) if p < classes][: 1 + trial % 3]
        ours = logits.clone().requires_grad_()
        theirs = logits.clone().requires_grad_()
        got = finer_scores(ours, 0.7, positions)
        expected = finer_scores_by_full_orderings(theirs, 0.7, positions)
        assert torch.equal(got, expected), (trial, positions)
        weights = torch.randn(n, classes, generator=generator, dtype=torch.float64)
        (got * weights).sum().backward()
        (expected * weights).sum().backward()
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-12, atol=1e-14)


def test_a_nan_logit_leaves_the_other_examples_explained():
    """One example's NaN logit made the chunked selection fail for the whole batch with a
    shape error; as with the full orderings, only that example's score is NaN."""
    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    logits[0, 4] = float("nan")
    logits[1, 2] = float("inf")
    got = finer_scores(logits, 1.0, (1, 2, 3))
    expected = finer_scores_by_full_orderings(logits, 1.0, (1, 2, 3))
    torch.testing.assert_close(got, expected, equal_nan=True, rtol=0, atol=0)
    assert torch.isfinite(got[2]).all()
