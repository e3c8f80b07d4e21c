"""Per-image fits that end empty (or lose the class) after every restart are reported: such
a mask explains nothing, and pruning cannot make it (a tutorial run returned 0 % of a
digit's pixels with ``prune=True`` and no word)."""

import dataclasses
import warnings

import pytest

from captum_ext.attr import WEIGHT_PRESETS, ActivationMatchingMask
from captum_ext.bundled import BUNDLED_MASK_LAYERS, MASK_OPTIONS, load_bundled_model
from captum_ext.data import load_sample_digits


@pytest.fixture(scope="module")
def bundled():
    images, _ = load_sample_digits()
    return load_bundled_model(), images[:3]


def _mask(model, area_factor: float) -> ActivationMatchingMask:
    weights = WEIGHT_PRESETS["sparse"]
    weights = dataclasses.replace(weights, area=weights.area * area_factor)
    return ActivationMatchingMask(
        model, list(BUNDLED_MASK_LAYERS), weights=weights, baseline=MASK_OPTIONS["baseline"]
    )


def test_fits_that_explain_nothing_are_named_in_a_warning(bundled):
    model, images = bundled
    with pytest.warns(UserWarning, match=r"for (\d) of 3 images \(index [\d, ]+\)") as caught:
        result = _mask(model, 1000.0).attribute(
            images,
            mode="per_image",
            steps=20,
            restarts=0,
            prune=True,
            return_details=True,
            progress=False,
        )
    failed = (~result.agreement).nonzero().flatten().tolist()
    message = next(str(w.message) for w in caught if "ActivationMatchingMask" in str(w.message))
    assert failed, "the area pressure of this set-up empties some masks"
    assert f"for {len(failed)} of 3 images (index {', '.join(map(str, failed))})" in message


def test_fits_that_keep_the_class_do_not_warn(bundled):
    model, images = bundled
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = _mask(model, 1.0).attribute(
            images[:1],
            mode="per_image",
            steps=60,
            prune=True,
            return_details=True,
            progress=False,
        )
    assert bool(result.agreement.all())
    assert not [w for w in caught if "every per-image fit" in str(w.message)]
