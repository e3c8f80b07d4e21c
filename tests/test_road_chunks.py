"""ROAD and completeness impute ``batch_size`` rows at a time.

Both imputed every (image, fraction) pair at once and only split the forward passes by
``batch_size``: about 34 MB per 224 px image at 9 fractions, so a few hundred images ran out
of memory whatever ``batch_size`` (soundness already imputed in chunks). The rows' noise
depends on their example and mask only, so the scores are those of one pass.
"""

from __future__ import annotations

import pytest
import torch

import captum_ext.metrics.remove_and_debias as rad
from captum_ext.metrics import completeness, road

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def imputed_rows(monkeypatch):
    sizes = []
    original = rad._imputed

    def spy(images, removed, *args, **kwargs):
        sizes.append(images.shape[0])
        return original(images, removed, *args, **kwargs)

    monkeypatch.setattr(rad, "_imputed", spy)
    return sizes


@pytest.mark.parametrize("metric", ["road", "completeness"])
def test_rows_are_imputed_batch_size_at_a_time_with_the_same_scores(
    bundled_model, sample_digits, imputed_rows, metric
):
    x, y = sample_digits[0][:6], sample_digits[1][:6]
    maps = x.abs() + torch.linspace(0, 1e-3, 28 * 28).view(1, 1, 28, 28)  # no ties
    call = road if metric == "road" else completeness
    whole = call(bundled_model, x, maps, target=y, batch_size=1000)
    assert imputed_rows == [6 * len(whole.percentages if metric == "road" else whole.thresholds)]
    imputed_rows.clear()
    chunked = call(bundled_model, x, maps, target=y, batch_size=4)
    assert imputed_rows and max(imputed_rows) <= 4
    for name in ("probability", "correct") if metric == "road" else ("drop",):
        torch.testing.assert_close(getattr(chunked, name), getattr(whole, name), rtol=0, atol=1e-6)
