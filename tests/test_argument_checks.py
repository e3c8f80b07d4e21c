"""Bad arguments found by fuzzing the public API, each refused by name.

Before, each of these returned a wrong result without a word (NaN maps, blank masks, a
"randomised" layer that has nothing to randomise, a string flag read as True, complex scores
cut to their real part) or failed inside torch, numpy or Python without naming the argument.
"""

from __future__ import annotations

import pytest
import torch

from captum_ext.attr import VOICE, ActivationMatchingMask, GradCAM, LayerIBA, MaskLossWeights
from captum_ext.attr.activation_matching import WEIGHT_PRESETS
from captum_ext.data import default_cam_layer, log_probabilities
from captum_ext.introspection.network import make_head
from captum_ext.inversion import one_hot_vectors, soft_vectors
from captum_ext.metrics import (
    AUAC,
    AUPR,
    AUROC,
    ROAD,
    DeletionAUC,
    ExpectedCalibrationError,
    FPRAtTPR,
    PointingGame,
    completeness,
    deletion,
    model_randomisation,
    road,
    road_imputation,
    softmax_confidence,
    soundness,
    spearman_similarity,
    ssim_similarity,
    structure_deletion,
)
from captum_ext.testing import null_region_oracle

LAYER = "features.7"


@pytest.fixture
def digits(bundled_model, sample_digits):
    x, y = sample_digits[0][:3], sample_digits[1][:3]
    maps = GradCAM(bundled_model, LAYER).attribute(x, target=y, upsample_to_input=True)
    return bundled_model, x, y, maps


def _weights_with(**changes):
    fields = dict(vars(WEIGHT_PRESETS["mnist"]))
    fields.update(changes)
    return MaskLossWeights(**fields)


CASES = {
    "LayerIBA min_std=0 (all-NaN maps)": (
        lambda m, x, y, maps: LayerIBA(m, LAYER).attribute(x, target=y, min_std=0.0),
        ValueError,
        "`min_std`",
    ),
    "MaskLossWeights with a NaN weight (blank masks)": (
        lambda m, x, y, maps: ActivationMatchingMask(
            m, [LAYER], weights=_weights_with(act=float("nan"))
        ),
        ValueError,
        r"`weights\['act'\]` must be finite",
    ),
    "MaskLossWeights with kl_temperature=0": (
        lambda m, x, y, maps: ActivationMatchingMask(
            m, [LAYER], weights=_weights_with(kl_temperature=0.0)
        ),
        ValueError,
        "kl_temperature",
    ),
    "deletion baselines=nan (NaN scores)": (
        lambda m, x, y, maps: deletion(m, x, maps, target=y, baselines=float("nan")),
        ValueError,
        "`baselines`",
    ),
    "structure_deletion baselines=inf": (
        lambda m, x, y, maps: structure_deletion(m, x, maps, target=y, baselines=float("inf")),
        ValueError,
        "`baselines`",
    ),
    "ssim_similarity sigma=0 (NaN)": (
        lambda m, x, y, maps: ssim_similarity(maps, maps, sigma=0.0),
        ValueError,
        "`sigma`",
    ),
    "ssim_similarity an even window": (
        lambda m, x, y, maps: ssim_similarity(maps, maps, window=10),
        ValueError,
        "`window` must be odd",
    ),
    "ssim_similarity window=0": (
        lambda m, x, y, maps: ssim_similarity(maps, maps, window=0),
        ValueError,
        "`window`",
    ),
    "model_randomisation of a ReLU (similarity 1 by construction)": (
        lambda m, x, y, maps: model_randomisation(
            lambda model: GradCAM(model, LAYER), m, x, target=y, layers=["features.1"]
        ),
        ValueError,
        "no parameters of their own",
    ),
    "model_randomisation cascade='no'": (
        lambda m, x, y, maps: model_randomisation(
            lambda model: GradCAM(model, LAYER), m, x, target=y, cascade="no"
        ),
        TypeError,
        "`cascade`",
    ),
    "model_randomisation similarity=None": (
        lambda m, x, y, maps: model_randomisation(
            lambda model: GradCAM(model, LAYER), m, x, target=y, similarity=None
        ),
        TypeError,
        "`similarity`",
    ),
    "road_imputation tolerance=-1 (CG stopped at once)": (
        lambda m, x, y, maps: road_imputation(
            x, maps[:, 0] > 0.5, noise=0.0, solver="cg", tolerance=-1.0
        ),
        ValueError,
        "`tolerance`",
    ),
    "GradCAM relu_attributions='False' (read as True)": (
        lambda m, x, y, maps: GradCAM(m, LAYER).attribute(x, target=y, relu_attributions="False"),
        TypeError,
        "`relu_attributions`",
    ),
    "GradCAM upsample_to_input='no'": (
        lambda m, x, y, maps: GradCAM(m, LAYER).attribute(x, target=y, upsample_to_input="no"),
        TypeError,
        "`upsample_to_input`",
    ),
    "spearman_similarity absolute='yes'": (
        lambda m, x, y, maps: spearman_similarity(maps, maps, absolute="yes"),
        TypeError,
        "`absolute`",
    ),
    "road percentages=[] (ZeroDivisionError)": (
        lambda m, x, y, maps: road(m, x, maps, target=y, percentages=[]),
        ValueError,
        "`percentages` is empty",
    ),
    "completeness thresholds=None": (
        lambda m, x, y, maps: completeness(m, x, maps, target=y, thresholds=None),
        TypeError,
        "`thresholds`",
    ),
    "soundness removed_fractions=[]": (
        lambda m, x, y, maps: soundness(m, x, maps, target=y, removed_fractions=[]),
        ValueError,
        "`removed_fractions` is empty",
    ),
    "inputs on the meta device": (
        lambda m, x, y, maps: softmax_confidence(m, x.to("meta")),
        ValueError,
        "`inputs` is on the meta device",
    ),
    "target on the meta device": (
        lambda m, x, y, maps: GradCAM(m, LAYER).attribute(x, target=y.to("meta")),
        ValueError,
        "`target` is on the meta device",
    ),
    "attributions on the meta device": (
        lambda m, x, y, maps: deletion(m, x, maps.to("meta"), target=y),
        ValueError,
        "`attributions` is on the meta device",
    ),
    "soft_vectors device='gpu7'": (
        lambda m, x, y, maps: soft_vectors(2, 10, device="gpu7"),
        ValueError,
        "`device`='gpu7' is not a torch device",
    ),
    "one_hot_vectors dtype='float32'": (
        lambda m, x, y, maps: one_hot_vectors(torch.tensor([0, 1]), 3, dtype="float32"),
        TypeError,
        "`dtype` must be a floating-point torch.dtype",
    ),
    "make_head in_features=-1": (
        lambda m, x, y, maps: make_head(-1, 10),
        ValueError,
        "`in_features`",
    ),
    "default_cam_layer of a string": (
        lambda m, x, y, maps: default_cam_layer("resnet"),
        TypeError,
        "`model` must be an nn.Module",
    ),
    "log_probabilities of a list": (
        lambda m, x, y, maps: log_probabilities([[0.5, 0.5]]),
        TypeError,
        "`probabilities`",
    ),
    "null_region_oracle seed='0'": (
        lambda m, x, y, maps: null_region_oracle(seed="0"),
        TypeError,
        "`seed`",
    ),
    "VOICE on meta inputs": (
        lambda m, x, y, maps: VOICE(GradCAM(m, LAYER)).attribute(x.to("meta")),
        ValueError,
        "meta device",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_argument_is_refused_by_name(name, digits):
    call, error, message = CASES[name]
    with pytest.raises(error, match=message):
        call(*digits)


ACCUMULATOR_OPTIONS = {
    "AUAC percentiles=[-1, 50]": (lambda: AUAC(percentiles=[-1, 50]), ValueError),
    "AUPR positive='inn'": (lambda: AUPR(positive="inn"), ValueError),
    "FPRAtTPR tpr=1.5": (lambda: FPRAtTPR(tpr=1.5), ValueError),
    "ExpectedCalibrationError n_bins=0": (lambda: ExpectedCalibrationError(n_bins=0), ValueError),
    "ExpectedCalibrationError norm='l3'": (lambda: ExpectedCalibrationError(norm="l3"), ValueError),
    "PointingGame tolerance='x'": (lambda: PointingGame(tolerance="x"), TypeError),
    "ROAD bogus=1": (lambda: ROAD(lambda x: x, bogus=1), TypeError),
    "DeletionAUC bogus=1": (lambda: DeletionAUC(lambda x: x, bogus=1), TypeError),
}


@pytest.mark.parametrize("name", list(ACCUMULATOR_OPTIONS))
def test_accumulator_options_are_checked_when_it_is_made(name):
    """They were checked only at `compute()` or the first `update`, after a dataset pass."""
    make, error = ACCUMULATOR_OPTIONS[name]
    with pytest.raises(error):
        make()


def test_complex_scores_are_refused_not_cut_to_their_real_part():
    accumulator = AUROC()
    with pytest.raises(TypeError, match="must hold real values"):
        accumulator.update(torch.rand(4) + 3j, torch.rand(4).to(torch.complex64))
