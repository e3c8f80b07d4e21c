"""GradTrust and the trust scores on confident models (logit gaps of 29 to 9,700), models
with other outputs than (N, C) logits (``output_transform``) and models in train mode.

The references are float64 computations (the same model in float64, or a hand formula) and
the plain models' scores."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from _helpers import assert_model_unchanged, make_confident_model, model_snapshot
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from captum_ext.metrics import (
    GradTrust,
    ScoreTable,
    auac,
    energy,
    gradnorm,
    gradtrust,
    log_likelihood,
    margin,
    mc_dropout,
    misprediction_auroc,
    negative_entropy,
    odin,
    purview,
    score_dataset,
    softmax_confidence,
)

#: an inner layer of the bundled model, so that GradTrust takes the autograd path
INNER = "features.6"


def _float64_pair(model32: nn.Module) -> nn.Module:
    """The same confident model in float64 (same scale as the fixture's model)."""
    for scale in (3.0, 30.0, 1000.0):
        candidate = make_confident_model(scale)
        if torch.equal(candidate.classifier.weight, model32.classifier.weight):
            return make_confident_model(scale, torch.float64)
    raise AssertionError("unknown confident model")


def _hand_log_gradtrust(logits: torch.Tensor, k: int = 5) -> torch.Tensor:
    """log(mean_Q ||p - e_Q||^2 / ||p - e_P||^2) in float64, written out directly (valid
    while 1 - p_P is a normal float64, i.e. logit gaps below ~700)."""
    z = logits.double()
    p = torch.softmax(z, 1)
    top = z.topk(k + 1, dim=1).indices
    out = []
    for n in range(z.shape[0]):
        dist = []
        for c in top[n].tolist():
            others = torch.cat([p[n, :c], p[n, c + 1 :]])
            dist.append(others.sum() ** 2 + (others**2).sum())  # (1 - p_c)^2 + sum p_j^2
        dist = torch.stack(dist)
        out.append(torch.log(dist[1:].mean() / dist[0]))
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------
# GradTrust is finite and ordered as in float64


@pytest.mark.parametrize("form", ["topk", "reference"])
def test_closed_form_log_scores_finite_and_equal_to_float64(confident_model, sample_digits, form):
    images, _ = sample_digits
    model64 = _float64_pair(confident_model)
    scores32 = gradtrust(confident_model, images, form=form, log=True)
    scores64 = gradtrust(model64, images.double(), form=form, log=True)
    assert scores32.dtype == torch.float32
    assert torch.isfinite(scores32).all()
    torch.testing.assert_close(scores32.double(), scores64, rtol=1e-5, atol=0)
    # the ranking that auac / AUROC use is that of float64
    assert torch.equal(torch.argsort(scores32), torch.argsort(scores64))


def test_topk_log_score_equals_hand_formula_in_float64(sample_digits):
    images, _ = sample_digits
    model = make_confident_model(3.0, torch.float64)  # gaps small enough for the hand formula
    with torch.no_grad():
        expected = _hand_log_gradtrust(model(images.double()))
    torch.testing.assert_close(
        gradtrust(model, images.double(), log=True), expected, rtol=1e-9, atol=0
    )
    # float32 on the same model, against the float64 hand formula
    scores32 = gradtrust(make_confident_model(3.0), images, log=True)
    torch.testing.assert_close(scores32.double(), expected, rtol=1e-5, atol=0)


def _mpmath_log_gradtrust(z: list[float], k: int) -> float:
    """The topk log-score in 60-digit arithmetic, straight from the definition."""
    mpmath = pytest.importorskip("mpmath")
    with mpmath.workdps(60):
        e = [mpmath.exp(mpmath.mpf(v)) for v in z]
        total = mpmath.fsum(e)
        p = [v / total for v in e]
        order = sorted(range(len(z)), key=lambda c: -z[c])[: k + 1]
        # ||p - e_c||^2 with 1 - p_c written as sum_{j != c} p_j (60 digits do not resolve
        # 1 - p_c when it is e^-10000)
        dist = [
            mpmath.fsum(p[j] for j in range(len(z)) if j != c) ** 2
            + mpmath.fsum(p[j] ** 2 for j in range(len(z)) if j != c)
            for c in order
        ]
        return float(mpmath.log(mpmath.fsum(dist[1:]) / k / dist[0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_logit_gaps_match_high_precision(dtype):
    """Logit gaps from 0 (ties) to 1e4, 2 to 50 classes: closed form and autograd path equal
    a 60-digit computation of the definition."""
    generator = torch.Generator().manual_seed(0)
    rows = [
        [1e4, 0.0],
        [3.0, 3.0],  # a tie: log-score 0
        [5e3, 5e3, -5e3, 0.0],  # tied prediction and runner-up
        [30.0, 1.0, 0.5, 0.0, -2.0],
        [1e4, 9999.0, 0.0, -1e4, 3.0, 2.0, 1.0],
    ]
    rows += (torch.randn(3, 50, generator=generator) * 1e3).tolist()
    for row in rows:
        c = len(row)
        k = min(5, c - 1)
        head = nn.Linear(c, c, bias=False).to(dtype)
        with torch.no_grad():
            head.weight.copy_(torch.eye(c))
        x = torch.tensor([row], dtype=dtype)  # the logits are the inputs
        expected = torch.tensor([_mpmath_log_gradtrust(row, k)], dtype=torch.float64)
        rtol = 1e-5 if dtype == torch.float32 else 1e-9
        for method in ("closed_form", "autograd"):
            got = gradtrust(head, x, k=k, log=True, method=method).double()
            torch.testing.assert_close(got, expected, rtol=rtol, atol=rtol, msg=f"{row} {method}")


@pytest.mark.parametrize("kwargs", [{"layer": INNER}, {"method": "autograd"}])
@pytest.mark.parametrize("form", ["topk", "reference"])
def test_autograd_path_float32_equals_float64(confident_model, sample_digits, kwargs, form):
    images, _ = sample_digits
    model64 = _float64_pair(confident_model)
    scores32 = gradtrust(confident_model, images, form=form, log=True, **kwargs)
    scores64 = gradtrust(model64, images.double(), form=form, log=True, **kwargs)
    assert torch.isfinite(scores32).all()
    torch.testing.assert_close(scores32.double(), scores64, rtol=1e-5, atol=0)
    assert torch.equal(torch.argsort(scores32), torch.argsort(scores64))
    if "method" in kwargs:  # the autograd path on the final layer equals the closed form
        closed = gradtrust(confident_model, images, form=form, log=True)
        torch.testing.assert_close(scores32, closed, rtol=1e-5, atol=0)


def test_raw_autograd_score_equals_float64_where_representable(sample_digits):
    """The score itself (log=False) on the autograd path: within 1e-4 of float64 where float32
    holds it (before: off by up to 3.5x, 31 of 40 digits off by more than 1 %), inf with a
    warning exactly where it exceeds the float32 range."""
    images, _ = sample_digits
    model32, model64 = make_confident_model(3.0), make_confident_model(3.0, torch.float64)
    with pytest.warns(RuntimeWarning, match="log=True"):
        scores32 = gradtrust(model32, images, layer=INNER)
    scores64 = gradtrust(model64, images.double(), layer=INNER)
    representable = scores64 < torch.finfo(torch.float32).max
    assert torch.equal(torch.isinf(scores32), ~representable)
    assert representable.sum() >= 35
    torch.testing.assert_close(
        scores32[representable].double(), scores64[representable], rtol=1e-4, atol=0
    )


def test_log_false_is_exp_of_log_true_and_warns_only_on_overflow(sample_digits):
    images, _ = sample_digits
    plain = make_confident_model(1.0)  # the bundled model: every score is representable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        raw = gradtrust(plain, images)
    log = gradtrust(plain, images, log=True)
    torch.testing.assert_close(raw, log.exp(), rtol=1e-5, atol=0)
    reference = gradtrust(plain, images, form="reference")
    torch.testing.assert_close(
        gradtrust(plain, images, form="reference", log=True), reference.log()
    )
    confident = make_confident_model(30.0)
    with pytest.warns(RuntimeWarning, match=r"of 40 examples exceeds the range of torch.float32"):
        gradtrust(confident, images)
    trust = GradTrust(confident, log=True)
    assert "log=True" in repr(trust)
    torch.testing.assert_close(trust.score(images), gradtrust(confident, images, log=True))
    with pytest.raises(TypeError, match="`log`"):
        gradtrust(plain, images, log="yes")


# ---------------------------------------------------------------------------------------------
# the metrics, score_dataset and the report on confident models


def test_auac_and_auroc_of_the_log_score_equal_float64(confident_model, sample_digits):
    images, labels = sample_digits
    model64 = _float64_pair(confident_model)
    with torch.no_grad():
        correct = confident_model(images).argmax(1) == labels
    scores32 = gradtrust(confident_model, images, log=True)
    scores64 = gradtrust(model64, images.double(), log=True)
    assert auac(scores32, correct) == auac(scores64, correct)
    assert misprediction_auroc(scores32, correct) == misprediction_auroc(scores64, correct)
    assert misprediction_auroc(scores32, correct) > 0.9  # the paper's claim holds here too


def test_curve_errors_count_the_non_finite_scores():
    with pytest.raises(
        ValueError,
        match=r"`scores` contains NaN or infinite values \(1 NaN and 2 "
        r"infinite of 4, the first at index 1\).*log=True",
    ):
        auac([0.0, math.inf, math.nan, -math.inf], [True, False, True, False])
    with pytest.raises(ValueError, match=r"`scores` contains NaN or infinite values \(0 NaN"):
        misprediction_auroc([0.0, math.inf], [True, False])


def test_score_dataset_on_a_confident_model(confident_model, sample_digits, tmp_path):
    images, labels = sample_digits
    loader = DataLoader(TensorDataset(images, labels), batch_size=16)
    table = score_dataset(
        confident_model, loader, ["gradtrust", "gradtrust_reference", "softmax"], progress=False
    )
    for name in table.score_names:
        assert torch.isfinite(table[name]).all(), name
    torch.testing.assert_close(table["gradtrust"], gradtrust(confident_model, images, log=True))
    read = ScoreTable.from_csv(table.to_csv(tmp_path / "scores.csv"))
    assert torch.isfinite(read["gradtrust"]).all()
    assert auac(read["gradtrust"], read["correct"]) == auac(table["gradtrust"], table["correct"])


@pytest.mark.slow
def test_trust_section_on_a_confident_model(confident_model, sample_digits, tmp_path):
    pytest.importorskip("matplotlib")
    from captum_ext.data import BUNDLED_CAM_LAYER, DIGIT_CLASSES, denormalize_digits
    from captum_ext.viz import trust_section

    images, labels = sample_digits
    section = trust_section(
        confident_model,
        BUNDLED_CAM_LAYER,
        images,
        denormalize_digits(images),
        DIGIT_CLASSES,
        tmp_path,
        progress=False,
        labels=labels,
        scores=["margin"],
        least_trusted=1,
    )
    rows = {row[0]: row for row in section.rows[0].table.rows}
    with torch.no_grad():
        correct = confident_model(images).argmax(1) == labels
    expected = auac(gradtrust(confident_model, images, log=True), correct)
    assert rows["gradtrust"][1] == f"{expected:.2f}"
    assert "Not ranked" not in section.intro
    # rows: the summary table, the colour scale, then the least-trusted image
    least = [row for row in section.rows if "GradTrust" in row.label]
    assert len(least) == 1 and "inf" not in least[0].label


def test_trust_section_leaves_out_a_score_with_nan_values(sample_digits, tmp_path, monkeypatch):
    """A score with NaN values is shown as not ranked (with the reason), not a failed report."""
    pytest.importorskip("matplotlib")
    from captum_ext.data import BUNDLED_CAM_LAYER, DIGIT_CLASSES, denormalize_digits
    from captum_ext.metrics import dataset
    from captum_ext.viz import trust_section

    def broken(model, inputs, **kwargs):
        values = margin(model, inputs, **kwargs)
        values[0] = math.nan
        return values

    monkeypatch.setitem(dataset.TRUST_SCORES, "margin", broken)
    images, labels = sample_digits
    section = trust_section(
        make_confident_model(1.0),
        BUNDLED_CAM_LAYER,
        images[:12],
        denormalize_digits(images[:12]),
        DIGIT_CLASSES,
        tmp_path,
        progress=False,
        labels=labels[:12],
        scores=["margin"],
        least_trusted=0,
    )
    rows = {row[0]: row for row in section.rows[0].table.rows}
    assert rows["margin"][1:] == ["-", "-", "-"]
    assert rows["gradtrust"][1] != "-"
    assert "Not ranked: margin (1 NaN and 0 infinite values of 12" in section.intro


# ---------------------------------------------------------------------------------------------
# output_transform


class DictOutput(nn.Module):
    """Returns {"logits": (N, C)}, as many detection / HF-style models do."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return {"logits": self.inner(x), "features": x.flatten(1)}


class ColumnOutput(nn.Module):
    """Returns (N, C, 1) logits."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x).unsqueeze(2)


WRAPPERS = [
    (DictOutput, lambda out: out["logits"]),
    (ColumnOutput, lambda out: out.squeeze(2)),
]

SCORE_CALLS = {
    "gradtrust": lambda f, x, **kw: gradtrust(f, x, log=True, **kw),
    "gradtrust_reference": lambda f, x, **kw: gradtrust(f, x, form="reference", **kw),
    "gradtrust_inner": lambda f, x, **kw: gradtrust(f, x, log=True, layer=_inner(f), **kw),
    "gradtrust_all": lambda f, x, **kw: gradtrust(f, x, log=True, layer="all", **kw),
    "softmax": softmax_confidence,
    "energy": energy,
    "entropy": negative_entropy,
    "margin": margin,
    "log_likelihood": log_likelihood,
    "odin": odin,
    "mc_dropout": lambda f, x, **kw: mc_dropout(f, x, n_passes=3, generator=0, **kw),
    "gradnorm": gradnorm,
    "gradnorm_inner": lambda f, x, **kw: gradnorm(f, x, layer=_inner(f), **kw),
    "purview": purview,
}


def _inner(model: nn.Module) -> nn.Module:
    base = model.inner if hasattr(model, "inner") else model
    return base.features[6]


@pytest.mark.parametrize("wrapper, transform", WRAPPERS, ids=["dict", "N_C_1"])
@pytest.mark.parametrize("name", list(SCORE_CALLS))
def test_output_transform_gives_the_plain_models_scores(sample_digits, wrapper, transform, name):
    images, _ = sample_digits
    images = images[:6]
    plain = make_confident_model(30.0)
    wrapped = wrapper(plain)
    expected = SCORE_CALLS[name](plain, images)
    before = model_snapshot(wrapped)
    got = SCORE_CALLS[name](wrapped, images, output_transform=transform)
    assert_model_unchanged(wrapped, before)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # without it, the error points to the argument
    with pytest.raises(ValueError, match="output_transform"):
        SCORE_CALLS[name](wrapped, images)


def test_gradtrust_class_output_transform_and_bad_transform(sample_digits):
    images, _ = sample_digits
    plain = make_confident_model(3.0)
    wrapped = DictOutput(plain)
    trust = GradTrust(wrapped, log=True, output_transform=lambda out: out["logits"])
    torch.testing.assert_close(trust.score(images[:5]), gradtrust(plain, images[:5], log=True))
    with pytest.raises(TypeError, match="`output_transform` must be callable"):
        gradtrust(plain, images[:2], output_transform="logits")
    with pytest.raises(TypeError, match="`output_transform` must be callable"):
        softmax_confidence(plain, images[:2], output_transform=3)
    with pytest.raises(TypeError, match="`output_transform` must be callable"):
        GradTrust(plain, output_transform=3)


# ---------------------------------------------------------------------------------------------
# models in train mode


TRAIN_MODE_CALLS = {
    "gradtrust": lambda m, x: gradtrust(m, x),
    "gradtrust_reference": lambda m, x: gradtrust(m, x, form="reference"),
    "gradtrust_autograd": lambda m, x: gradtrust(m, x, k=2, method="autograd"),
    "gradtrust_inner": lambda m, x: gradtrust(m, x, k=2, layer="features.3.conv"),
    "gradtrust_all": lambda m, x: gradtrust(m, x, k=2, layer="all"),
    "GradTrust": lambda m, x: GradTrust(m, layer="features.0").score(x),
    "softmax": softmax_confidence,
    "energy": energy,
    "entropy": negative_entropy,
    "margin": margin,
    "log_likelihood": log_likelihood,
    "odin": odin,
    "mc_dropout": lambda m, x: mc_dropout(m, x, n_passes=2, generator=0),
    "gradnorm": gradnorm,
    "gradnorm_inner": lambda m, x: gradnorm(m, x, layer="head.1"),
    "purview": purview,
}


@pytest.mark.parametrize("name", list(TRAIN_MODE_CALLS))
def test_model_in_train_mode_keeps_its_batchnorm_statistics(tiny_cnn, tiny_inputs, name):
    model = tiny_cnn.train()
    before = model_snapshot(model)
    scores = TRAIN_MODE_CALLS[name](model, tiny_inputs)
    assert scores.shape == (tiny_inputs.shape[0],)
    assert_model_unchanged(model, before)  # running_mean / running_var / num_batches_tracked
    assert all(m.training for m in model.modules())
