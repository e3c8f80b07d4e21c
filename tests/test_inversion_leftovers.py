"""TIE's predictions on non-finite images, ``uncertainty_ue``'s row-sum check and TIE on a
half-precision classifier.

Before: ``TIE.predict`` (and ``probabilities``, ``ood_score``, ``in_distribution_score``) took
images holding NaN or inf and called them in-distribution class 0 with NaN confidence, while
``TIE.fit`` refused them. ``uncertainty_ue`` refused genuine bfloat16 softmax rows (which miss
1 by up to about 3e-3; its tolerance was 1e-3) that ``expected_calibration_error`` took. A
float16 classifier's TIE.fit stopped in epoch 1 ("the classifier's training loss became nan"):
the classifier, and Adam's moments, were trained in float16, where Adam's ``eps`` is 0.
"""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from _helpers import assert_model_unchanged, make_tiny_cnn, model_snapshot

import captum_ext.inversion.tie as tie_module
from captum_ext._utils.training import load_checkpoint
from captum_ext._utils.validation import row_sum_tolerance
from captum_ext.inversion.tie import TIE, uncertainty_ue
from captum_ext.metrics import expected_calibration_error

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE, CLASSES = (3, 8, 8), 5
SMALL = {
    "input_shape": SHAPE,
    "generator_steps": 2,
    "generator_batch_size": 6,
    "latent_dim": 8,
    "generator_width": 8,
    "batch_size": 16,
}
HALF = [torch.float16, torch.bfloat16]


def tiny_data(n: int = 60, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SHAPE, generator=gen), torch.arange(n) % CLASSES


# ----------------------------------------------------------------- non-finite predictions

PREDICTIONS = [
    ("predict", {}),
    ("probabilities", {}),
    ("ood_score", {}),
    ("ood_score", {"kind": "ue"}),
    ("ood_score", {"kind": "garbage"}),
    ("in_distribution_score", {}),
    ("in_distribution_score", {"kind": "ue"}),
]


@pytest.fixture(scope="module")
def tie() -> TIE:
    return TIE(make_tiny_cnn(dtype=torch.float32, num_classes=CLASSES), **SMALL)


@pytest.mark.parametrize("method, options", PREDICTIONS, ids=lambda v: str(v))
def test_predictions_refuse_images_holding_nan_or_inf_as_fit_does(tie, method, options):
    x, y = tiny_data(3)
    x[0, 0, 1, 1] = float("nan")
    x[1, 2, 0, 0] = float("inf")
    said = "`inputs` must be finite: 2 of 3 images hold NaN or infinite values."
    with pytest.raises(ValueError, match=re.escape(said)):
        getattr(tie, method)(x, **options)
    with pytest.raises(ValueError, match=re.escape(said)):
        tie.fit(x, y, epochs=1, progress=False)
    # finite images (and none) are still taken
    result = getattr(tie, method)(x[2:], **options)
    values = result.confidence if method == "predict" else result
    assert bool(torch.isfinite(values).all())
    getattr(tie, method)(x[:0], **options)


# ----------------------------------------------------------------- uncertainty_ue row sums


@pytest.mark.parametrize("classes", [10, 1000])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_ue_takes_half_precision_softmaxes_as_the_calibration_error_does(dtype, classes):
    generator = torch.Generator().manual_seed(classes)
    logits = torch.randn(500, classes, generator=generator) * 3
    labels = torch.randint(0, classes, (500,), generator=generator)
    for probs in (logits.to(dtype).softmax(1), logits.softmax(1).to(dtype)):
        ue = uncertainty_ue(probs)
        assert ue.dtype == dtype and bool(((ue >= 0) & (ue <= 1)).all())
        expected_calibration_error(probs, labels)  # taken by both


@pytest.mark.parametrize("dtype", [*HALF, torch.float32, torch.float64], ids=str)
def test_ue_and_the_calibration_error_refuse_the_same_rows(dtype):
    generator = torch.Generator().manual_seed(0)
    sigmoids = torch.randn(20, 10, generator=generator).sigmoid().to(dtype)
    labels = torch.randint(0, 10, (20,), generator=generator)
    with pytest.raises(ValueError, match="`probs` rows must sum to 1"):
        uncertainty_ue(sigmoids)
    with pytest.raises(ValueError, match="`probabilities_or_confidences` rows must sum to 1"):
        expected_calibration_error(sigmoids, labels)
    # around the shared tolerance: rows off by half of it are taken, off by twice refused
    tolerance = row_sum_tolerance(4)
    for off, taken in ((tolerance / 2, True), (-tolerance / 2, True), (2 * tolerance, False)):
        rows = torch.tensor([[0.4 + off, 0.3, 0.2, 0.1]], dtype=torch.float64)
        for function, arguments in ((uncertainty_ue, ()), (expected_calibration_error, ([0],))):
            if taken:
                function(rows, *arguments)
            else:
                with pytest.raises(ValueError, match="rows must sum to 1"):
                    function(rows, *arguments)
    # UE's message gives no advice about the calibration error's (N,) confidences
    with pytest.raises(ValueError) as raised:
        uncertainty_ue(sigmoids)
    assert "confidences" not in str(raised.value)


# ----------------------------------------------------------------- TIE of a half model


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_tie_fits_a_half_precision_classifier(dtype):
    model = make_tiny_cnn(dtype=torch.float32, num_classes=CLASSES).to(dtype)
    before = model_snapshot(model)
    x, y = tiny_data()
    tie = TIE(model, **SMALL, seed=5)
    log = tie.fit(x, y, epochs=1, progress=False)
    assert all(math.isfinite(value) for value in log["loss"])
    for name, param in tie.model.named_parameters():
        assert param.dtype == dtype, name  # the classifier keeps its dtype
        assert bool(torch.isfinite(param).all()), name
    # Adam and its moments work on float32 copies, which round to the parameters
    for state in tie.optimizer.state.values():
        assert all(v.dtype == torch.float32 for k, v in state.items() if k != "step")
    for param, master in tie._masters:
        assert master.dtype == torch.float32 and torch.equal(master.to(dtype), param)
    result = tie.predict(x[:10])
    assert bool(torch.isfinite(result.confidence).all())
    assert bool(torch.isfinite(tie.probabilities(x[:10])).all())
    assert bool(torch.isfinite(tie.ood_score(x[:10], "ue")).all())
    assert tie.model(x[:2].to(dtype)).dtype == dtype
    assert_model_unchanged(model, before)  # the user's model: untouched


class _Recorded:
    """torch.nn.functional, with a cross-entropy that records each value."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def __getattr__(self, name):
        return getattr(torch.nn.functional, name)

    def cross_entropy(self, *args, **kwargs):
        loss = torch.nn.functional.cross_entropy(*args, **kwargs)
        self.losses.append(float(loss.detach()))
        return loss


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_a_half_classifier_loss_follows_its_float32_twin(dtype, monkeypatch):
    """The same initialisation and data: the first epoch's per-step training losses differ
    from the float32 twin's by rounding only."""
    full = make_tiny_cnn(dtype=torch.float32, num_classes=CLASSES)
    half = copy.deepcopy(full).to(dtype)
    x, y = tiny_data()
    losses = []
    for model in (full, half):
        recorded = _Recorded()
        monkeypatch.setattr(tie_module, "F", recorded)
        tie = TIE(model, **SMALL, seed=5, final_training=False)
        tie.fit(x, y, epochs=1, progress=False)
        losses.append(torch.tensor(recorded.losses))
    want, have = losses
    assert have.numel() == want.numel() == 5  # (60 images + 12 noise seeds) / 16
    torch.testing.assert_close(have, want, rtol=0.02, atol=0.01)


def test_a_float16_tie_resumes_exactly_and_rolls_back(tmp_path, monkeypatch):
    """The float32 master copies are in the checkpoint (the float16 parameters alone would
    round them), and a failed fit puts them back."""
    model = make_tiny_cnn(dtype=torch.float32, num_classes=CLASSES).half()
    x, y = tiny_data()
    full = TIE(model, **SMALL, seed=3)
    full.fit(x, y, epochs=2, progress=False, checkpoint=tmp_path / "full.pt")

    broken = TIE(model, **SMALL, seed=3)
    original, calls = broken._invert_and_exclude, {"n": 0}

    def fail_second(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(broken, "_invert_and_exclude", fail_second)
    with pytest.raises(KeyboardInterrupt):
        broken.fit(x, y, epochs=2, progress=False, checkpoint=tmp_path / "part.pt")
    # rolled back: the master copies as before the fit
    assert all(torch.equal(m, p.float()) for p, m in broken._masters)
    saved = load_checkpoint(tmp_path / "part.pt")
    assert [m.dtype for m in saved["classifier_masters"]] == [torch.float32] * len(broken._masters)
    resumed = TIE(model, **SMALL, seed=3)
    resumed.fit(x, y, epochs=2, progress=False, checkpoint=tmp_path / "part.pt", resume=True)
    for (p, m), (q, n) in zip(full._masters, resumed._masters, strict=True):
        assert torch.equal(m, n) and torch.equal(p, q)
    assert torch.equal(full.pool, resumed.pool)
