"""numpy values where a Python value is accepted: the same result, or an error naming the
argument.

- a numpy array with negative strides (``np.flip``, ``argsort()[::-1]``) as ``target`` /
  ``contrast`` or as an array-like metric input was refused ("At least one stride in the
  given numpy array is negative"); it holds the same values as its contiguous copy;
- ``np.True_`` was refused as a flag ("must be a bool, got bool");
- numpy numbers (``np.int64``, ``np.float32``) were refused where Python ones are accepted
  (in inversion with messages such as "`lr` must be a positive float, got np.float32(0.001)");
- ``within_class_diversity`` named a ``model`` argument it does not have, and a list as
  ``conditioning`` / ``preset`` failed with "unhashable type: 'list'".
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from captum.attr import Saliency
from torch.utils.data import TensorDataset

from captum_ext.attr import ActivationMatchingMask, Contrastive, GradCAM, PathwayGradient
from captum_ext.attr.activation_matching import WEIGHT_PRESETS
from captum_ext.inversion import (
    ConditionedGenerator,
    NetworkInversion,
    TIEConfig,
    one_hot_vectors,
    shortcut_dataset,
    soft_vectors,
    transformed_inputs,
    within_class_diversity,
)
from captum_ext.metrics import (
    AUROC,
    GradTrust,
    auac,
    auroc,
    deletion,
    expected_calibration_error,
    gradtrust,
    road_imputation,
)

IMAGES = torch.rand(3, 1, 6, 6, generator=torch.Generator().manual_seed(0))
REMOVED = torch.rand(3, 1, 6, 6, generator=torch.Generator().manual_seed(1)) < 0.4
MODEL = torch.nn.Sequential(
    torch.nn.Conv2d(1, 2, 3, padding=1),
    torch.nn.ReLU(),
    torch.nn.Flatten(),
    torch.nn.Linear(72, 4),
).eval()
torch.nn.init.normal_(MODEL[0].weight, generator=torch.Generator().manual_seed(2))
SHORTCUT_DATA = TensorDataset(
    torch.rand(6, 1, 12, 12, generator=torch.Generator().manual_seed(3)),
    torch.tensor([0, 1, 2, 0, 1, 2]),
)
SCORES = np.random.default_rng(0).normal(size=30)


def _auroc_accumulated(in_scores) -> float:
    metric = AUROC()
    metric.update(in_scores, SCORES[:20])
    return metric.compute()


def _attributions(result):
    """The attributions of ``PathwayGradient.attribute`` in either of its return forms."""
    return getattr(result, "attributions", result)


def _mask_and_pruned(prune) -> tuple:
    """The mask of a short per-image fit and its count of pruned pixels (None when the
    pruning pass did not run)."""
    result = ActivationMatchingMask(MODEL, ["1"]).attribute(
        IMAGES[:1],
        target=0,
        mode="per_image",
        steps=2,
        restarts=0,
        sufficiency_samples=0,
        generator=0,
        progress=False,
        return_details=True,
        prune=prune,
    )
    return result.mask, result.pruned


def _dropout_rates(module: torch.nn.Module) -> list[float]:
    return [m.p for m in module.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)]


def _same(got, expected):
    if isinstance(expected, tuple):
        assert isinstance(got, tuple) and len(got) == len(expected)
        for got_item, expected_item in zip(got, expected):
            _same(got_item, expected_item)
    elif isinstance(expected, torch.Tensor):
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
    else:
        assert got == expected
        assert type(got) is type(expected)  # plain Python values downstream


# ------------------------------------------------------------------ negative strides

REVERSED_CALLS = {
    # each call gets a numpy array; `reversed` gives it a negative-stride view of it
    "GradCAM(target=)": (
        lambda a: GradCAM(MODEL, MODEL[0]).attribute(IMAGES, target=a),
        np.array([0, 1, 3]),
    ),
    "Contrastive(contrast=)": (
        lambda a: Contrastive(Saliency(MODEL)).attribute(IMAGES, contrast=a),
        np.array([1, 2, 3]),
    ),
    "auroc(in_scores=)": (lambda a: auroc(a, SCORES[:20] - 0.5), SCORES),
    "auac(scores=)": (lambda a: auac(a, a > 0), SCORES),
    "expected_calibration_error(probabilities_or_confidences=)": (
        lambda a: expected_calibration_error(a, np.arange(30) % 3 > 0),
        np.linspace(0.4, 0.95, 30),
    ),
    "AUROC.update(in_scores=)": (_auroc_accumulated, SCORES),
    "shortcut_dataset(intensities=)": (
        lambda a: shortcut_dataset(SHORTCUT_DATA, "intensity", intensities=a).intensities,
        np.array([-0.5, 0.1, 0.4]),
    ),
}


@pytest.mark.parametrize("name", list(REVERSED_CALLS))
def test_a_reversed_numpy_view_reads_as_its_values(name):
    """A view with negative strides holds the same values as its contiguous copy, so it
    gives the same result."""
    call, values = REVERSED_CALLS[name]
    view = values[::-1]
    assert view.strides[0] < 0
    _same(call(view), call(view.copy()))


# ------------------------------------------------------------------ numpy bools as flags

FLAG_CALLS = {
    "PathwayGradient(multiply_by_inputs=)": lambda v: (
        PathwayGradient(MODEL, multiply_by_inputs=v).multiplies_by_inputs
    ),
    "PathwayGradient.attribute(return_pathway=)": lambda v: _attributions(
        PathwayGradient(MODEL).attribute(IMAGES, target=0, n_steps=2, return_pathway=v)
    ),
    "PathwayGradient.attribute(multiply_by_inputs=)": lambda v: PathwayGradient(MODEL).attribute(
        IMAGES, target=0, n_steps=2, multiply_by_inputs=v
    ),
    "gradtrust(log=)": lambda v: gradtrust(MODEL, IMAGES, log=v),
    "GradTrust(log=)": lambda v: GradTrust(MODEL, log=v).log,
    "shortcut_dataset(conflicting=)": lambda v: (
        shortcut_dataset(SHORTCUT_DATA, conflicting=v).cue_offsets
    ),
    "ActivationMatchingMask.attribute(prune=)": lambda v: _mask_and_pruned(prune=v),
    "ActivationMatchingMask(weights={'rob_gradient': })": lambda v: (
        ActivationMatchingMask(
            MODEL, ["1"], weights={**vars(WEIGHT_PRESETS["mnist"]), "rob_gradient": v}
        ).weights.rob_gradient
    ),
}


@pytest.mark.filterwarnings("ignore:ActivationMatchingMask.*explains nothing")
@pytest.mark.parametrize("flag", [True, False])
@pytest.mark.parametrize("name", list(FLAG_CALLS))
def test_a_numpy_bool_is_a_flag(name, flag):
    _same(FLAG_CALLS[name](np.bool_(flag)), FLAG_CALLS[name](flag))


# ------------------------------------------------------------------ numpy numbers

DIGIT_MODEL = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10)).eval()

NUMBER_CALLS = {
    # name: (call, Python value, the same number in numpy)
    "ActivationMatchingMask(baseline=)": (
        lambda v: ActivationMatchingMask(MODEL, ["1"], baseline=v).baseline,
        0.25,
        np.float32(0.25),
    ),
    "ActivationMatchingMask(necessity_margin=)": (
        lambda v: ActivationMatchingMask(MODEL, ["1"], necessity_margin=v).necessity_margin,
        1.5,
        np.float32(1.5),
    ),
    "ActivationMatchingMask(weights={'nec': })": (
        lambda v: (
            ActivationMatchingMask(
                MODEL, ["1"], weights={**vars(WEIGHT_PRESETS["mnist"]), "nec": v}
            ).weights.nec
        ),
        0.5,
        np.float32(0.5),
    ),
    "ActivationMatchingMask(layers={layer: weight})": (
        lambda v: ActivationMatchingMask(MODEL, {"1": v}).layer_weights,
        2.0,
        np.float16(2.0),
    ),
    "deletion(baselines=)": (
        lambda v: deletion(MODEL, IMAGES, IMAGES, target=0, n_steps=3, baselines=v),
        0.5,
        np.float32(0.5),
    ),
    "gradtrust(k=)": (lambda v: gradtrust(MODEL, IMAGES, k=v), 2, np.int64(2)),
    "road_imputation(generator=)": (
        lambda v: road_imputation(IMAGES, REMOVED, generator=v),
        5,
        np.int64(5),
    ),
    "one_hot_vectors(num_classes=)": (
        lambda v: one_hot_vectors(torch.tensor([0, 3]), v),
        10,
        np.int64(10),
    ),
    "soft_vectors(n=)": (lambda v: soft_vectors(v, 4, generator=0), 3, np.int64(3)),
    "ConditionedGenerator(num_classes=, out_shape=, dropout=)": (
        lambda v: (lambda g: (g.num_classes, g.out_shape, _dropout_rates(g)))(
            ConditionedGenerator(v[0], out_shape=v[1], dropout=v[2])
        ),
        (10, (1, 28, 28), 0.25),
        (np.int64(10), tuple(np.int64(s) for s in (1, 28, 28)), np.float32(0.25)),
    ),
    "NetworkInversion(lr=, seed=)": (
        lambda v: (lambda inversion: (inversion.optimizer.param_groups[0]["lr"], inversion.seed))(
            NetworkInversion(DIGIT_MODEL, input_shape=(1, 28, 28), lr=v[0], seed=v[1])
        ),
        (0.5, 4),
        (np.float32(0.5), np.int64(4)),
    ),
    "TIEConfig(seed=, dropout=)": (
        lambda v: (lambda config: (config.seed, config.dropout))(
            TIEConfig(seed=v[0], dropout=v[1])
        ),
        (3, 0.25),
        (np.int64(3), np.float32(0.25)),
    ),
    "transformed_inputs(max_correlation=)": (
        lambda v: transformed_inputs(IMAGES, 3, max_correlation=v, generator=0),
        0.5,
        np.float32(0.5),
    ),
}


@pytest.mark.parametrize("name", list(NUMBER_CALLS))
def test_a_numpy_number_is_the_number(name):
    call, python_value, numpy_value = NUMBER_CALLS[name]
    _same(call(numpy_value), call(python_value))


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda: ActivationMatchingMask(MODEL, ["1"], baseline=np.True_), "baseline"),
        (lambda: gradtrust(MODEL, IMAGES, k=np.True_), "k"),
        (lambda: road_imputation(IMAGES, REMOVED, generator=True), "generator"),
        (lambda: soft_vectors(True, 4), "n"),
        (lambda: NetworkInversion(DIGIT_MODEL, input_shape=(1, 28, 28), seed=True), "seed"),
    ],
    ids=["baseline", "k", "generator", "n", "seed"],
)
def test_a_bool_is_still_not_a_number(call, argument):
    with pytest.raises((TypeError, ValueError), match=f"`{argument}`"):
        call()


# ------------------------------------------------------------------ argument names


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: within_class_diversity(
                np.zeros((4, 3), np.float32), None, torch.tensor([0, 0, 1, 1])
            ),
            "`source` must be the model .* or an N x D tensor of features, got ndarray",
        ),
        (
            lambda: ConditionedGenerator(10, conditioning=["vector_matrix"]),
            r"`conditioning` must be one of .*got \['vector_matrix'\]",
        ),
        (
            lambda: NetworkInversion(DIGIT_MODEL, preset=["inversion"], input_shape=(1, 28, 28)),
            r"`preset` must be one of .*got \['inversion'\]",
        ),
    ],
    ids=["within_class_diversity(source=)", "conditioning", "preset"],
)
def test_an_unusable_value_is_named(call, message):
    with pytest.raises((TypeError, ValueError), match=message):
        call()


def test_a_zero_dimensional_numpy_array_is_refused_as_a_zero_dimensional_tensor_is():
    """Reading numpy arrays through a contiguous copy must not turn a 0-d array into one
    example (np.ascontiguousarray returns at least 1-d)."""
    from captum_ext.metrics import expected_calibration_error

    for value, label in ((np.array(0.9), np.array(1.0)), (torch.tensor(0.9), torch.tensor(1.0))):
        with pytest.raises(ValueError, match="shape"):
            expected_calibration_error(value, label)
