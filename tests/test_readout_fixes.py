"""Read-outs that gave a number where they should have refused, or refused what they should
have taken.

- ``label_consistency`` and ``mean_confidence`` (and ``within_class_diversity`` on images,
  ``privacy_audit``) fed uint8 pixels (0..255) to the model as raw floats, where TIE,
  ActivationMatchingMask, PathwayGradient and the perturbation metrics refuse them.
- ``within_class_diversity`` scored identical samples with all-zero features 0 ("perfectly
  diverse") though identical samples give 1.
- ``matched_ssim`` refused numpy float32 scalars (``images.max() - images.min()`` of a float32
  array) for ``threshold`` and ``data_range``.
- ``expected_calibration_error`` / ``reliability_diagram`` took (N, C) rows that do not sum
  to 1 (per-class sigmoids) and boolean class labels, and gave a number.
- ``shortcut_audit``'s example showed ``accuracy_clean`` as 1.0 (the doctest NUMBER flag hid
  the real 0.975).
- VOICE did not hand its ``reshape_transform`` to the gradient engine, so a tokens-first
  transformer layer was refused even with a transform that moves the examples first.
"""

from __future__ import annotations

import copy
import doctest
import importlib

import numpy as np
import pytest
import torch
from _helpers import assert_model_unchanged, make_tiny_cnn, model_snapshot
from torch import nn

from captum_ext.inversion import TIE, privacy_audit, uncertainty_ue
from captum_ext.inversion.evaluation import (
    label_consistency,
    matched_ssim,
    mean_confidence,
    within_class_diversity,
)
from captum_ext.metrics import (
    ExpectedCalibrationError,
    expected_calibration_error,
    reliability_diagram,
)

FLOAT_ONLY = r"must be floating point \(the (model|classifier)'s inputs\), got torch\.{}\."


def _pixels(n: int = 6, dtype=torch.uint8, side: int = 6) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return (torch.rand(n, 1, side, side, generator=generator) * 255).to(dtype)


# -------------------------------------------------------------------------- integer images


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool])
@pytest.mark.parametrize(
    "call",
    [
        lambda m, x, y: label_consistency(m, x, y),
        lambda m, x, y: mean_confidence(m, x),
        lambda m, x, y: mean_confidence(m, x, y),
        lambda m, x, y: within_class_diversity(m, x, y),
    ],
)
def test_integer_images_are_refused_before_the_model_sees_them(call, dtype):
    """Was: uint8 0..255 run through the model as floats (mean_confidence 1.0,
    label_consistency 0.0 on the bundled model), without an error."""
    model = make_tiny_cnn(in_channels=1, num_classes=5, dtype=torch.float32)
    before = model_snapshot(model)
    x = _pixels(dtype=dtype) if dtype != torch.bool else _pixels() > 127
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    with pytest.raises(TypeError, match="`images` " + FLOAT_ONLY.format(str(dtype)[6:])):
        call(model, x, y)
    assert_model_unchanged(model, before)
    # the same images as floats are taken
    call(model, x.float(), y)


def test_the_refusal_says_what_tie_says():
    model = make_tiny_cnn(in_channels=1, num_classes=5, dtype=torch.float32)
    x = _pixels()
    with pytest.raises(TypeError) as ours:
        mean_confidence(model, x)
    with pytest.raises(TypeError) as ties:
        TIE(model, input_shape=(1, 6, 6), num_classes=5).predict(x)
    # the same sentence, with the argument's name and the word for the model
    normalise = lambda message: message.replace("`images`", "`x`").replace("classifier", "model")  # noqa: E731
    assert normalise(str(ours.value)) == normalise(str(ties.value)).replace("`inputs`", "`x`")


def test_privacy_audit_refuses_integer_images():
    model = make_tiny_cnn(in_channels=1, num_classes=5, dtype=torch.float32)
    training = torch.rand(4, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 0, 1])
    options = {"samples_per_class": 1, "progress": False, "data_range": 1.0}
    with pytest.raises(TypeError, match="`training_images` " + FLOAT_ONLY.format("uint8")):
        privacy_audit(
            model, (training * 255).to(torch.uint8), labels, inversion=lambda y: training[y]
        )
    as_pixels = lambda y: (training[y] * 255).to(torch.uint8)  # noqa: E731
    with pytest.raises(TypeError, match="`inversion samples` " + FLOAT_ONLY.format("uint8")):
        privacy_audit(model, training, labels, inversion=as_pixels, **options)
    result = privacy_audit(model, training, labels, inversion=lambda y: training[y], **options)
    assert result.matched.mean == pytest.approx(1.0)


def test_matched_ssim_still_compares_integer_pixels():
    """SSIM compares pixels, not model inputs: uint8 images are compared as their values."""
    pixels = _pixels(4)
    labels = torch.tensor([0, 0, 1, 1])
    ours = matched_ssim(pixels, pixels.flip(0), labels, labels.flip(0), progress=False)
    floats = matched_ssim(
        pixels.float(), pixels.flip(0).float(), labels, labels.flip(0), progress=False
    )
    torch.testing.assert_close(ours.ssim, floats.ssim)


# -------------------------------------------------------------------------- zero features


def _hand_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """The documented rule: two zero vectors are identical, zero and non-zero orthogonal."""
    na, nb = float(a.norm()), float(b.norm())
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return float(a @ b) / (na * nb)


def _hand_diversity(features: torch.Tensor) -> float:
    n = len(features)
    pairs = [_hand_cosine(features[i], features[j]) for i in range(n) for j in range(n) if i != j]
    return sum(pairs) / len(pairs)


def test_identical_zero_features_are_not_diverse():
    """Was: 0.0 ("perfectly diverse") for four identical all-zero feature vectors."""
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2])
    features = torch.zeros(9, 8, dtype=torch.float64)
    features[4] = torch.arange(8.0)  # class 1: one non-zero, two zero vectors
    features[7] = torch.ones(8)  # class 2: parallel non-zero vectors
    features[8] = 2 * torch.ones(8)
    result = within_class_diversity(features, None, labels)
    assert result.per_class.tolist() == pytest.approx([1.0, 1 / 3, 1.0])
    for i, k in enumerate(result.classes.tolist()):
        assert float(result.per_class[i]) == pytest.approx(_hand_diversity(features[labels == k]))
    assert within_class_diversity(torch.zeros(4, 8), None, torch.zeros(4).long()).mean == 1.0


def test_a_generator_collapsed_to_blank_images_scores_one():
    """The images path: identical blank images, and identical non-blank images that a dead
    ReLU maps to zero features, score 1 like identical images with non-zero features."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8, bias=False), nn.ReLU(), nn.Linear(8, 3))
    model.eval()
    labels = torch.zeros(5, dtype=torch.long)
    blank = torch.zeros(5, 1, 4, 4)
    assert within_class_diversity(model, blank, labels).mean == pytest.approx(1.0)
    dead = copy.deepcopy(model)
    with torch.no_grad():
        dead[1].weight.copy_(-dead[1].weight.abs())  # every unit off for positive images
    same = torch.rand(1, 1, 4, 4).add(0.1).repeat(5, 1, 1, 1)
    assert within_class_diversity(dead, same, labels).mean == pytest.approx(1.0)
    assert within_class_diversity(model, same, labels).mean == pytest.approx(1.0)
    # distinct images, one of them blank: the rule, pair by pair, on the penultimate features
    mixed = torch.cat([torch.zeros(1, 1, 4, 4), torch.rand(3, 1, 4, 4)])
    with torch.no_grad():
        features = model[:3](mixed).double()
    got = within_class_diversity(model, mixed, labels[:4]).mean
    assert got == pytest.approx(_hand_diversity(features), abs=1e-12)


# -------------------------------------------------------------------------- SSIM numbers


def _ssim_inputs():
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 0])
    return x, x.flip(0), y, y


@pytest.mark.parametrize(
    "value",
    [
        np.float32(0.4),
        np.float64(0.4),
        np.float16(0.4),
        torch.tensor(0.4),
        np.array(0.4, dtype=np.float32),
        0.4,
    ],
    ids=["np.float32", "np.float64", "np.float16", "0-d tensor", "0-d array", "float"],
)
def test_matched_ssim_takes_any_real_number(value):
    """Was: TypeError "`threshold` must be a number, got float32" and ValueError
    "`data_range` must be a positive number, got np.float32(0.99583054)"."""
    generated, training, labels_g, labels_t = _ssim_inputs()
    expected = matched_ssim(
        generated, training, labels_g, labels_t, threshold=float(value), progress=False
    )
    got = matched_ssim(generated, training, labels_g, labels_t, threshold=value, progress=False)
    assert got.threshold == float(value) and isinstance(got.threshold, float)
    assert got.share_above == expected.share_above
    pixels = generated.numpy()
    for data_range in (pixels.max() - pixels.min(), torch.as_tensor(value), value):
        got = matched_ssim(
            generated, training, labels_g, labels_t, data_range=data_range, progress=False
        )
        assert isinstance(got.data_range, float) and got.data_range == float(data_range)
    expected = matched_ssim(
        generated, training, labels_g, labels_t, data_range=1, progress=False
    ).ssim
    got = matched_ssim(generated, training, labels_g, labels_t, data_range=np.int64(1))
    torch.testing.assert_close(got.ssim, expected)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"threshold": True}, TypeError),
        ({"threshold": np.bool_(True)}, TypeError),
        ({"threshold": torch.tensor(True)}, TypeError),
        ({"threshold": torch.tensor([0.4])}, TypeError),
        ({"threshold": "0.4"}, TypeError),
        ({"threshold": np.float32(1.5)}, ValueError),
        ({"threshold": np.float32("nan")}, ValueError),
        ({"data_range": True}, TypeError),
        ({"data_range": np.float32(0.0)}, ValueError),
        ({"data_range": np.float32(-1.0)}, ValueError),
        ({"data_range": np.float32("inf")}, ValueError),
        ({"data_range": torch.tensor(float("nan"))}, ValueError),
        ({"data_range": np.array([1.0])}, TypeError),
    ],
)
def test_matched_ssim_still_refuses_what_is_no_number_or_out_of_range(kwargs, error):
    (argument,) = kwargs
    with pytest.raises(error, match=f"`{argument}`"):
        matched_ssim(*_ssim_inputs(), progress=False, **kwargs)


# -------------------------------------------------------------------------- calibration


SIGMOIDS = torch.tensor([[0.9, 0.8, 0.7], [0.2, 0.1, 0.05], [0.6, 0.9, 0.95]])


@pytest.mark.parametrize("function", [expected_calibration_error, reliability_diagram])
def test_rows_that_do_not_sum_to_one_are_refused(function):
    """Was: ECE 0.1167 on per-class sigmoid rows (sums 2.4, 0.35, 2.45) without an error;
    uncertainty_ue refuses the same rows."""
    labels = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="`probabilities_or_confidences` rows must sum to 1"):
        function(SIGMOIDS, labels)
    with pytest.raises(ValueError, match="rows must sum to 1"):
        uncertainty_ue(SIGMOIDS)
    # logits that happen to lie in [0, 1], and rows off by 2e-2 (more than rounding gives:
    # off by 1e-3 is a softmax written with 3 decimals, and is taken)
    with pytest.raises(ValueError, match="row 0 sums to 0.6"):
        function(torch.tensor([[0.2, 0.4], [0.5, 0.5]], dtype=torch.float64), labels[:2])
    with pytest.raises(ValueError, match=r"row 1 sums to 1.02 \(tolerance 0.01\)"):
        function(torch.tensor([[0.3, 0.7], [0.5, 0.52]], dtype=torch.float64), labels[:2])
    function(torch.tensor([[0.3, 0.7], [0.5, 0.501]], dtype=torch.float64), labels[:2])
    # the (N,) confidences of the same predictions are what to pass instead
    confidence, predicted = SIGMOIDS.max(dim=1)
    function(confidence, predicted == labels)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("classes", [2, 10, 1000])
def test_softmax_rows_of_every_precision_are_taken(dtype, classes):
    generator = torch.Generator().manual_seed(classes)
    logits = torch.randn(500, classes, generator=generator) * 3
    labels = torch.randint(0, classes, (500,), generator=generator)
    for probabilities in (logits.to(dtype).softmax(1), logits.softmax(1).to(dtype)):
        ece = expected_calibration_error(probabilities, labels)
        assert reliability_diagram(probabilities, labels).calibration_error() == pytest.approx(
            ece, abs=1e-12
        )
        metric = ExpectedCalibrationError()  # stores float64: the tolerance follows the values
        metric.update(probabilities, labels)
        assert metric.compute() == pytest.approx(ece, abs=1e-12)
        # numpy arrays too
        if dtype in (torch.float16, torch.float32, torch.float64):
            assert expected_calibration_error(probabilities.numpy(), labels.numpy()) == ece


@pytest.mark.parametrize("function", [expected_calibration_error, reliability_diagram])
def test_boolean_class_labels_are_refused(function):
    """Was: booleans read as classes 0 / 1 with (N, C) probabilities; TIE and the inversion
    evaluation refuse boolean labels."""
    probabilities = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    with pytest.raises(TypeError, match="`labels` must hold integer class indices, got torch.bool"):
        function(probabilities, torch.tensor([True, False, True]))
    with pytest.raises(TypeError, match="`labels`"):
        function(probabilities.numpy(), np.array([True, False, True]))
    function(probabilities, torch.tensor([1, 0, 1]))
    # with (N,) confidences booleans say whether each prediction is correct, as documented
    function(probabilities.max(1).values, torch.tensor([True, False, True]))


# -------------------------------------------------------------------------- docstring numbers


@pytest.fixture
def doctest_globals(bundled_model, bundled_digits, monkeypatch, tmp_path):
    from captum_ext.data import BUNDLED_CAM_LAYER, DIGIT_CLASSES, denormalize_digits

    monkeypatch.chdir(tmp_path)
    images, labels = bundled_digits
    return {
        "torch": torch,
        "nn": nn,
        "model": bundled_model,
        "images": images.clone(),
        "inputs": images.clone(),
        "labels": labels.clone(),
        "shown": denormalize_digits(images),
        "x": images[:4].clone(),
        "layer": BUNDLED_CAM_LAYER,
        "layer_module": bundled_model.get_submodule(BUNDLED_CAM_LAYER),
        "DIGIT_CLASSES": DIGIT_CLASSES,
    }


@pytest.mark.parametrize(
    "module",
    [
        "captum_ext.inversion.audits",
        "captum_ext.inversion.evaluation",
        "captum_ext.metrics.calibration",
        "captum_ext.attr.voice",
    ],
)
def test_examples_show_the_numbers_they_produce(module, doctest_globals):
    """The examples are run with the NUMBER flag, which let ``audit.accuracy_clean`` show
    1.0 for 0.975; without it every number shown must be the one printed."""
    flags = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS
    runner = doctest.DocTestRunner(optionflags=flags)
    for test in doctest.DocTestFinder().find(importlib.import_module(module)):
        if not test.examples:
            continue
        test.globs.update(copy.copy(doctest_globals))
        test.globs["model"] = copy.deepcopy(doctest_globals["model"]).eval()
        runner.run(test, out=lambda _text: None)
    assert runner.failures == 0, f"{runner.failures} example(s) of {module} differ"


# -------------------------------------------------------------------------- VOICE, tokens first


@pytest.mark.parametrize("n", [1, 3, 17])
def test_voice_explains_a_tokens_first_layer_through_a_transposing_transform(n):
    """Was: ValueError "tokens-first" even with ``reshape_transform=fold_tokens_first``:
    VOICE did not pass the transform to the engine's examples-first check. Now the maps of
    the tokens-first model equal those of the same weights run batch-first (n=17 is the
    token count, so the layout cannot be told from the shape)."""
    from test_vit_segmentation_fixes import NORM, fold, fold_tokens_first, images, tiny_vit

    from captum_ext.attr import VOICE, GradCAM, LayerGradCamPlusPlus

    batch_first, tokens_first = tiny_vit(), tiny_vit(batch_first=False)
    before = model_snapshot(tokens_first)
    x = images(n)
    for cam in (GradCAM, LayerGradCamPlusPlus):
        expected = VOICE(cam(batch_first, NORM)).attribute(x, reshape_transform=fold)
        got = VOICE(cam(tokens_first, NORM)).attribute(x, reshape_transform=fold_tokens_first)
        for field in ("explanation", "contrast", "uncertainty"):
            want, have = getattr(expected, field), getattr(got, field)
            assert have.shape == want.shape and have.shape[0] == n
            assert bool((want != 0).any())
            torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-6)
        for field in ("prediction", "target", "contrast_class", "n_contrasts"):
            assert torch.equal(getattr(got, field), getattr(expected, field))
    assert_model_unchanged(tokens_first, before)
    # without the transform the layer is still refused (where the shape tells the layout)
    with pytest.raises(ValueError, match="tokens-first"):
        VOICE(GradCAM(tokens_first, NORM)).attribute(images(2))


def test_the_shared_reshape_transform_text_names_tokens_first_layers():
    from captum_ext.attr import VOICE, GradCAM

    for documented in (GradCAM.attribute, VOICE.attribute):
        text = " ".join(documented.__doc__.split())
        assert "tokens-first layer (T, N, K)" in text
        assert "lambda t: fold(t.transpose(0, 1))" in text
