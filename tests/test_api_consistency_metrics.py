"""API consistency of the metrics (an audit of how alike functions read alike arguments).

- ``class_sensitivity(contrast=None)`` meant "the prediction" (and was refused: "`contrast`
  equals `target`"), while ContrastCAM / Contrastive read ``contrast=None`` as the runner-up,
  class_sensitivity's own default: None is now the runner-up.
- ``spearman_similarity`` read one ``(H, W)`` map as H rows and returned ``(H,)`` row-by-row
  correlations (and correlated several channels at once), where ``ssim_similarity`` takes
  ``(N, 1, H, W)`` or ``(N, H, W)`` maps only: both take (and refuse) the same shapes.
- ``accuracy_retention_curve`` / ``auac`` / ``AUAC`` took fractions as percentiles without a
  word: (0.1, 0.5, 0.9) kept 99.9 % to 99.1 % of the examples (road, completeness and soundness
  take fractions); percentiles that all lie in (0, 1] are warned about.
- ``score_dataset`` applied an ``output_transform`` given in ``score_kwargs`` to the scores
  but not to its own prediction (a one-logit or dict-output model failed); it now takes
  ``output_transform`` itself, for the prediction and every score.
- ``ClassSensitivity`` / ``RandomisationCurves`` printed every value of their maps.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from captum.attr import Saliency
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from captum_ext.data import two_class_logits
from captum_ext.metrics import (
    AUAC,
    accuracy_retention_curve,
    auac,
    class_sensitivity,
    margin,
    model_randomisation,
    score_dataset,
    softmax_confidence,
    spearman_similarity,
    ssim_similarity,
)
from captum_ext.metrics.sanity import rank_correlation

pytestmark = pytest.mark.filterwarnings("ignore:Setting forward, backward hooks")


class _SmallNet(nn.Module):
    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        return self.fc(self.pool(self.relu(self.conv(x))).flatten(1))


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return _SmallNet().eval(), torch.randn(3, 3, 8, 8)


# --- class_sensitivity: contrast=None


def test_class_sensitivity_reads_contrast_none_as_the_runner_up(small):
    """None is the runner-up (the documented default), as for ContrastCAM and Contrastive;
    it was read as the prediction and refused as equal to the target."""
    model, images = small
    explainer = lambda m: Saliency(m)  # noqa: E731
    as_none = class_sensitivity(explainer, model, images, contrast=None)
    runner_up = class_sensitivity(explainer, model, images, contrast="runner-up")
    torch.testing.assert_close(as_none.contrast, runner_up.contrast)
    # the runner-up by definition: the second largest logit
    torch.testing.assert_close(as_none.contrast, model(images).topk(2, dim=1).indices[:, 1])
    torch.testing.assert_close(as_none.similarity["ssim"], runner_up.similarity["ssim"])


# --- spearman_similarity: the shapes ssim_similarity takes


def test_spearman_refuses_a_single_map_and_several_channels_as_ssim_does():
    """A single (H, W) map gave (H,) row-by-row correlations; (N, 3, H, W) one correlation
    of all channels. Both are refused naming the arguments, with ssim_similarity's message."""
    generator = torch.Generator().manual_seed(0)
    one_a, one_b = torch.rand(2, 12, 12, generator=generator)
    several = torch.rand(2, 3, 8, 8, generator=generator)
    for similarity in (spearman_similarity, ssim_similarity):
        with pytest.raises(ValueError, match=r"`maps_a` and `maps_b` must be \(N, 1, H, W\)"):
            similarity(one_a, one_b)
        with pytest.raises(ValueError, match="reduce the channels"):
            similarity(several, several.flip(0))


def test_spearman_takes_maps_with_or_without_the_channel_axis():
    generator = torch.Generator().manual_seed(1)
    a, b = torch.rand(2, 4, 6, 6, generator=generator)
    torch.testing.assert_close(
        spearman_similarity(a, b), spearman_similarity(a[:, None], b[:, None])
    )
    # a single map as a batch of one: its Spearman correlation over all its pixels
    single = spearman_similarity(a[0][None], b[0][None], absolute=False)
    torch.testing.assert_close(single, rank_correlation(a[0].reshape(1, -1), b[0].reshape(1, -1)))
    assert single.shape == (1,)


def test_rank_correlation_matches_scipy_on_rows():
    """The row correlation itself (what patch saturation ranks with) is unchanged."""
    stats = pytest.importorskip("scipy.stats")
    generator = torch.Generator().manual_seed(2)
    a = torch.randint(0, 4, (3, 20), generator=generator).double()  # ties
    b = torch.randn(3, 20, generator=generator, dtype=torch.float64)
    expected = [stats.spearmanr(a[i], b[i]).statistic for i in range(3)]
    torch.testing.assert_close(rank_correlation(a, b), torch.tensor(expected, dtype=torch.float64))


# --- accuracy_retention_curve / auac / AUAC: fractions given as percentiles


_SCORES = torch.tensor([0.9, 0.8, 0.7, 0.3, 0.2, 0.1])
_CORRECT = torch.tensor([True, True, False, True, False, False])


@pytest.mark.parametrize(
    "call",
    [
        lambda p: accuracy_retention_curve(_SCORES, _CORRECT, percentiles=p),
        lambda p: auac(_SCORES, _CORRECT, percentiles=p),
        lambda p: AUAC(percentiles=p),
    ],
    ids=["accuracy_retention_curve", "auac", "AUAC"],
)
def test_fractions_given_as_percentiles_are_warned_about(call):
    """0.1 is the 0.1th percentile (it keeps 99.9 % of the examples), not 10 %."""
    with pytest.warns(UserWarning, match=r"`percentiles`.*0\.1 means 0\.1 %, not 10 %"):
        call((0.1, 0.5, 0.9))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        call((10, 50, 90))
        call(None)
        call((1,))  # one small percentile is taken as meant (keep 99 %)
    with pytest.warns(UserWarning, match=r"`percentiles`"):
        call((0, 0.25, 0.5, 0.75))  # a grid of fractions from 0 (np.arange(0, 1, 0.25))


def test_percentiles_below_one_still_mean_percent():
    """The warning changes nothing: m_t = ceil((100 - t) N / 100)."""
    with pytest.warns(UserWarning, match="percentiles"):
        curve = accuracy_retention_curve(
            torch.rand(1000), torch.rand(1000) > 0.5, percentiles=(0.5, 0.9)
        )
    assert curve.kept.tolist() == [995, 991]


def test_auac_accumulator_warns_once_when_made():
    from captum_ext.metrics import AUAC

    with pytest.warns(UserWarning, match="percentiles") as record:
        metric = AUAC(percentiles=(0.1, 0.5, 0.9))
    assert len(record) == 1
    metric.update(torch.tensor([0.9, 0.1, 0.7]), torch.tensor([True, False, True]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metric.compute()
        metric.compute()


# --- score_dataset: output_transform for the prediction and every score


class _OneLogit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3 * 8 * 8, 1)

    def forward(self, x):
        return self.linear(x.flatten(1))


class _DictOutput(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return {"logits": self.inner(x)}


def _logits_of(output):
    return output["logits"]


def _loader(images: torch.Tensor, labels: torch.Tensor) -> DataLoader:
    return DataLoader(TensorDataset(images, labels), batch_size=4)


def test_score_dataset_output_transform_of_a_one_logit_model():
    """The prediction is the arg-max of two_class_logits(model(x)) and the scores equal the
    direct calls with the same output_transform (they failed: "labels must be class indices
    in 0 .. 0")."""
    torch.manual_seed(0)
    model = _OneLogit().eval()
    images = torch.randn(8, 3, 8, 8)
    with torch.no_grad():
        predicted = two_class_logits(model(images)).argmax(1)
    labels = predicted.clone()
    labels[0] = 1 - labels[0]  # one wrong
    table = score_dataset(
        model,
        _loader(images, labels),
        scores=("softmax", "margin"),
        output_transform=two_class_logits,
        progress=False,
    )
    assert table["prediction"].tolist() == predicted.tolist()
    assert table["correct"].tolist() == (predicted == labels).tolist()
    direct = torch.cat(
        [
            softmax_confidence(model, part, output_transform=two_class_logits)
            for part in images.split(4)
        ]
    )
    torch.testing.assert_close(table["softmax"], direct)
    direct = torch.cat(
        [margin(model, part, output_transform=two_class_logits) for part in images.split(4)]
    )
    torch.testing.assert_close(table["margin"], direct)


def test_score_dataset_output_transform_of_a_dict_output_model(small):
    """A model returning {"logits": ...} was refused ("must return (N, C) logits, got
    dict"); with output_transform it is scored as its inner model."""
    model, _ = small
    images = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    labels = torch.arange(8) % 5
    plain = score_dataset(
        model, _loader(images, labels), scores=("softmax", "energy"), progress=False
    )
    wrapped = score_dataset(
        _DictOutput(model),
        _loader(images, labels),
        scores=("softmax", "energy"),
        output_transform=_logits_of,
        progress=False,
    )
    for column in plain.columns:
        torch.testing.assert_close(wrapped[column], plain[column])


def test_score_dataset_output_transform_in_score_kwargs_reaches_the_prediction():
    """Given (the same) to every requested score in score_kwargs, it reads the prediction
    too, as additional_forward_args there does."""
    torch.manual_seed(1)
    model = _OneLogit().eval()
    images = torch.randn(8, 3, 8, 8)
    with torch.no_grad():
        predicted = two_class_logits(model(images)).argmax(1)
    table = score_dataset(
        model,
        _loader(images, predicted),
        scores=("softmax",),
        score_kwargs={"softmax": {"output_transform": two_class_logits}},
        progress=False,
    )
    assert table["prediction"].tolist() == predicted.tolist()


def test_score_dataset_output_transform_given_twice_is_refused_and_to_some_scores_is_theirs(small):
    model, images = small
    loader = _loader(images, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="`output_transform` is given to score_dataset and in"):
        score_dataset(
            _DictOutput(model),
            loader,
            scores=("softmax",),
            output_transform=_logits_of,
            score_kwargs={"softmax": {"output_transform": _logits_of}},
            progress=False,
        )
    # a transform one score takes for itself: the prediction is the model's own arg-max
    halved = score_dataset(
        model,
        loader,
        scores=("softmax", "energy"),
        score_kwargs={"softmax": {"output_transform": lambda logits: logits / 2}},
        progress=False,
    )
    with torch.no_grad():
        logits = model(images)
    assert torch.equal(halved["prediction"], logits.argmax(1))
    torch.testing.assert_close(
        halved["softmax"], softmax_confidence(model, images, output_transform=lambda z: z / 2)
    )
    with pytest.raises(TypeError, match="`output_transform` must be a callable"):
        score_dataset(model, loader, scores=("softmax",), output_transform="logits", progress=False)
    with pytest.raises(ValueError, match=r"score_dataset\(\.\.\., output_transform=\.\.\.\)"):
        score_dataset(_DictOutput(model), loader, scores=("softmax",), progress=False)


# --- reprs: shapes and dtypes, not values


def test_sanity_results_print_shapes_not_values(small):
    model, images = small
    explainer = lambda m: Saliency(m)  # noqa: E731
    sensitivity = class_sensitivity(explainer, model, images)
    text = repr(sensitivity)
    assert "tensor(" not in text and len(text.splitlines()) == 1
    assert "target_maps=Tensor(shape=(3, 1, 8, 8), dtype=" in text
    assert "'ssim': Tensor(shape=(3,), dtype=float64)" in text
    curves = model_randomisation(explainer, model, images, similarity="spearman_abs")
    text = repr(curves)
    assert "tensor(" not in text and len(text.splitlines()) == 1
    assert "<2 layers: 'fc', 'conv'>" in text
    assert "randomised=Tensor(shape=(2, 3, 1, 8, 8), dtype=" in text
    # the fields themselves are unchanged
    assert curves.layers == ["fc", "conv"]


def test_a_registered_score_without_additional_forward_args_is_not_run_without_them(
    small, monkeypatch
):
    """The model's extra inputs go to every score: one registered in TRUST_SCORES without
    that parameter fails instead of scoring the output of another call of the model."""
    from captum_ext.metrics import dataset as dataset_module

    model, images = small

    def plain_softmax(model, inputs):
        return torch.softmax(model(inputs), 1).amax(1)

    monkeypatch.setitem(dataset_module.TRUST_SCORES, "plain_softmax", plain_softmax)
    loader = _loader(images, torch.tensor([0, 1, 2]))

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x, scale=1.0):  # optional: a score without it runs silently
            return self.inner(x) * scale

    with pytest.raises(ValueError, match="plain_softmax of TRUST_SCORES take no"):
        score_dataset(
            Scaled(),
            loader,
            scores=("plain_softmax",),
            additional_forward_args=(2.0,),
            progress=False,
        )
