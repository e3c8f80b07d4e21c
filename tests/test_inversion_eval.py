"""captum_ext.inversion.evaluation: checked against direct computations and scikit-image."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _helpers import assert_model_unchanged, make_tiny_cnn, model_snapshot
from skimage.metrics import structural_similarity

from captum_ext.inversion.evaluation import (
    label_consistency,
    matched_ssim,
    mean_confidence,
    sample_grid,
    within_class_diversity,
)


@pytest.fixture
def model():
    return make_tiny_cnn(in_channels=1, num_classes=5)


@pytest.fixture
def images():
    generator = torch.Generator().manual_seed(3)
    return torch.randn(14, 1, 6, 6, generator=generator, dtype=torch.float64)


@pytest.fixture
def labels():
    return torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 0, 2, 1])


def _eval_logits(model, images):
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        return reference(images)


# ---------------------------------------------------------------- label consistency / confidence


def test_label_consistency_matches_direct_count(model, images, labels):
    logits = _eval_logits(model, images)
    # make a known share of labels consistent: the first 9 are the predictions
    targets = labels.clone()
    targets[:9] = logits.argmax(1)[:9]
    expected = float((logits.argmax(1) == targets).double().mean())
    assert label_consistency(model, images, targets) == pytest.approx(expected, abs=0)
    assert label_consistency(model, images, targets, batch_size=4) == pytest.approx(expected)
    assert label_consistency(model, images, logits.argmax(1)) == 1.0


def test_mean_confidence_matches_softmax(model, images, labels):
    probs = torch.softmax(_eval_logits(model, images), dim=1)
    top = float(probs.max(1).values.mean())
    of_label = float(probs[torch.arange(len(labels)), labels].mean())
    assert mean_confidence(model, images) == pytest.approx(top, rel=1e-12)
    assert mean_confidence(model, images, labels, batch_size=3) == pytest.approx(
        of_label, rel=1e-12
    )


def test_evaluation_runs_in_eval_mode_and_leaves_model_unchanged(model, images, labels):
    model.train()  # dropout on: results would be random if the function did not switch
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    model.features[0].register_forward_hook(lambda m, i, o: None)
    before = model_snapshot(model)
    expected = _eval_logits(model, images).argmax(1)
    assert label_consistency(model, images, expected) == 1.0
    mean_confidence(model, images, labels)
    within_class_diversity(model, images, labels)
    assert_model_unchanged(model, before)
    assert model.training


def test_model_unchanged_when_evaluation_raises(model, images):
    before = model_snapshot(model)
    with pytest.raises(ValueError, match="`labels`"):
        label_consistency(model, images, torch.full((len(images),), 7))
    assert_model_unchanged(model, before)


def test_plain_callable_classifier(model, images, labels):
    logits = _eval_logits(model, images)
    assert label_consistency(lambda x: logits[: len(x)], images, labels) == pytest.approx(
        float((logits.argmax(1) == labels).double().mean())
    )


# ---------------------------------------------------------------- diversity


def _hand_diversity(features, labels):
    per_class = {}
    for k in sorted(set(labels.tolist())):
        rows = features[labels == k]
        pairs = [
            float(F.cosine_similarity(rows[i], rows[j], dim=0))
            for i in range(len(rows))
            for j in range(len(rows))
            if i != j
        ]
        per_class[k] = sum(pairs) / len(pairs) if pairs else float("nan")
    return per_class


def test_within_class_diversity_uses_penultimate_features(model, images, labels):
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        penultimate = reference.head(reference.pool(reference.features(images)))
    hand = _hand_diversity(penultimate, labels)
    result = within_class_diversity(model, images, labels, batch_size=5)
    assert result.classes.tolist() == [0, 1, 2, 3, 4]
    assert result.counts.tolist() == [4, 3, 3, 2, 2]
    for i, k in enumerate(result.classes.tolist()):
        assert float(result.per_class[i]) == pytest.approx(hand[k], abs=1e-10)
    assert result.mean == pytest.approx(np.mean(list(hand.values())), abs=1e-10)
    # the same through a named layer (head's output is the last Linear's input) and as tensor
    named = within_class_diversity(model, images, labels, feature_layer="head")
    torch.testing.assert_close(named.per_class, result.per_class)
    given = within_class_diversity(penultimate, None, labels)
    torch.testing.assert_close(given.per_class, result.per_class)


def test_within_class_diversity_extremes():
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    features = torch.tensor(
        [[1.0, 2.0], [2.0, 4.0], [0.5, 1.0], [1.0, 0.0], [0.0, 3.0], [1.0, 1.0]]
    )
    result = within_class_diversity(features, None, labels)
    assert float(result.per_class[0]) == pytest.approx(1.0)  # collapsed: all parallel
    assert float(result.per_class[1]) == pytest.approx(0.0)  # orthogonal
    assert torch.isnan(result.per_class[2])  # single sample
    assert result.mean == pytest.approx(0.5)


# ---------------------------------------------------------------- matched SSIM


def _random_images(n, channels=1, side=9, seed=0):
    generator = torch.Generator().manual_seed(seed)
    base = torch.rand(n, channels, side, side, generator=generator, dtype=torch.float64)
    return F.avg_pool2d(F.pad(base, (1, 1, 1, 1), mode="replicate"), 3, stride=1)


def _brute_force_best(scores):
    """Maximal total of a one-to-one assignment, by enumerating all of them."""
    n_rows, n_cols = scores.shape
    best = -np.inf
    if n_rows <= n_cols:
        for cols in itertools.permutations(range(n_cols), n_rows):
            best = max(best, sum(scores[i, c] for i, c in enumerate(cols)))
    else:
        for rows in itertools.permutations(range(n_rows), n_cols):
            best = max(best, sum(scores[r, j] for j, r in enumerate(rows)))
    return best


def test_matched_ssim_against_brute_force_and_skimage():
    generated = _random_images(7, seed=1)
    training = _random_images(8, seed=2)
    labels_g = torch.tensor([0, 0, 0, 1, 1, 1, 2])
    labels_t = torch.tensor([0, 0, 0, 0, 1, 1, 3, 3])
    result = matched_ssim(generated, training, labels_g, labels_t, progress=False)
    data_range = float(max(generated.max(), training.max()) - min(generated.min(), training.min()))
    assert result.data_range == pytest.approx(data_range)
    assert result.win_size == 7
    assert result.labels.tolist() == [0, 0, 0, 1, 1]  # 3 of class 0, min(3, 2) of class 1

    def ssim(g, t):
        return structural_similarity(
            generated[g, 0].numpy(), training[t, 0].numpy(), data_range=data_range, win_size=7
        )

    for value, g, t in zip(result.ssim, result.generated_index, result.training_index):
        assert float(value) == pytest.approx(ssim(int(g), int(t)), abs=1e-12)
        assert int(labels_g[g]) == int(labels_t[t])
    for k in (0, 1):
        gen = torch.nonzero(labels_g == k).flatten().tolist()
        train = torch.nonzero(labels_t == k).flatten().tolist()
        scores = np.array([[ssim(g, t) for t in train] for g in gen])
        mask = result.labels == k
        assert float(result.ssim[mask].sum()) == pytest.approx(_brute_force_best(scores), abs=1e-10)
        assert len(set(result.training_index[mask].tolist())) == int(mask.sum())  # one-to-one
        assert result.per_class_mean[k] == pytest.approx(float(result.ssim[mask].mean()))
    assert result.mean == pytest.approx(float(result.ssim.mean()))
    assert result.share_above == pytest.approx(float((result.ssim >= 0.4).double().mean()))


def test_matched_ssim_identical_and_permuted_copies():
    generated = _random_images(6, seed=4)
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    same = matched_ssim(generated, generated, labels, labels, progress=False)
    assert torch.allclose(same.ssim, torch.ones(6, dtype=torch.float64))
    assert same.mean == pytest.approx(1.0) and same.share_above == 1.0

    perm = torch.tensor([4, 2, 5, 0, 3, 1])
    training, labels_t = generated[perm], labels[perm]
    result = matched_ssim(generated, training, labels, labels_t, progress=False)
    # generated[i] == training[j] exactly when perm[j] == i
    for g, t in zip(result.generated_index.tolist(), result.training_index.tolist()):
        assert int(perm[t]) == g
    assert result.mean == pytest.approx(1.0)


def test_matched_ssim_colour_threshold_denormalize_win_size():
    generated = _random_images(4, channels=3, side=11, seed=5)
    training = _random_images(5, channels=3, side=11, seed=6)
    labels_g = torch.tensor([0, 0, 1, 1])
    labels_t = torch.tensor([0, 1, 0, 1, 1])
    result = matched_ssim(
        generated * 2 - 1,
        training * 2 - 1,
        labels_g,
        labels_t,
        denormalize=lambda x: (x + 1) / 2,
        data_range=1.0,
        win_size=5,
        threshold=0.05,
        progress=False,
    )
    for value, g, t in zip(result.ssim, result.generated_index, result.training_index):
        direct = structural_similarity(
            generated[g].numpy(), training[t].numpy(), data_range=1.0, win_size=5, channel_axis=0
        )
        assert float(value) == pytest.approx(direct, abs=1e-12)
    assert result.threshold == 0.05
    assert result.share_above == pytest.approx(float((result.ssim >= 0.05).double().mean()))


def test_matched_ssim_default_window_fits_small_and_mnist_images():
    small = _random_images(2, side=6, seed=7)
    labels = torch.tensor([0, 0])
    assert matched_ssim(small, small, labels, labels, progress=False).win_size == 5
    digits = _random_images(2, side=28, seed=8)
    assert matched_ssim(digits, digits, labels, labels, progress=False).win_size == 7


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"win_size": 4}, "`win_size`"),
        ({"win_size": 11}, "`win_size`"),
        ({"threshold": 1.5}, "`threshold`"),
        ({"data_range": 0.0}, "`data_range`"),
        ({"labels_generated": torch.tensor([0, 1])}, "`labels_generated`"),
        ({"labels_training": torch.tensor([5, 5, 5])}, "share no class"),
        ({"training": torch.rand(3, 1, 8, 8)}, "`training`"),
        ({"generated": [1, 2]}, "`generated`"),
        ({"labels_generated": torch.tensor([0.0, 1.0, 1.0])}, "`labels_generated`"),
        ({"denormalize": lambda x: x[:, :, :4]}, "`denormalize`"),
    ],
)
def test_matched_ssim_bad_arguments(kwargs, argument):
    arguments = {
        "generated": torch.rand(3, 1, 9, 9),
        "training": torch.rand(3, 1, 9, 9),
        "labels_generated": torch.tensor([0, 1, 1]),
        "labels_training": torch.tensor([0, 1, 0]),
        "progress": False,
    }
    arguments.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=argument):
        matched_ssim(**arguments)


# ---------------------------------------------------------------- sample grid


def test_sample_grid_layout_and_pixels():
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    images = torch.rand(7, 1, 5, 5, dtype=torch.float64) * 4 - 2
    labels = torch.tensor([2, 0, 2, 2, 0, 1, 2])
    figure = sample_grid(images, labels, per_class=2, denormalize=lambda x: (x + 2) / 4)
    assert isinstance(figure, Figure)
    axes = figure.axes
    assert len(axes) == 3 * 2 + 1  # the grid, then the grey-scale bar (issue 19)
    # row r = class r (ascending), first two images of that class in order
    expected = {0: [1, 4], 1: [5], 2: [0, 2]}
    for r in range(3):
        for c in range(2):
            ax = axes[r * 2 + c]
            if c < len(expected[r]):
                shown = np.asarray(ax.images[0].get_array())
                want = ((images[expected[r][c], 0] + 2) / 4).numpy()
                np.testing.assert_allclose(shown, want, atol=1e-12)
            else:
                assert not ax.images
    assert [axes[r * 2].get_ylabel() for r in range(3)] == ["0", "1", "2"]


def test_sample_grid_global_scale_and_colour():
    pytest.importorskip("matplotlib")
    images = torch.rand(4, 3, 5, 5) * 10
    labels = torch.tensor([0, 0, 1, 1])
    figure = sample_grid(images, labels, per_class=2, class_names=["cat", "dog"], title="t")
    shown = np.asarray(figure.axes[0].images[0].get_array())
    low, high = float(images.min()), float(images.max())
    np.testing.assert_allclose(
        shown, ((images[0] - low) / (high - low)).permute(1, 2, 0).numpy(), atol=1e-6
    )
    assert figure.axes[2].get_ylabel() == "dog"


def test_sample_grid_grey_images_get_a_scale_bar():
    """Issue 19: a grey-scale grid shows its scale; RGB grids (no colour map) do not."""
    pytest.importorskip("matplotlib")
    images = torch.rand(4, 1, 5, 5, dtype=torch.float64) * 6 - 1
    labels = torch.tensor([0, 0, 1, 1])
    stretched = sample_grid(images, labels, per_class=2)
    bar = stretched.axes[-1]
    assert len(stretched.axes) == 2 * 2 + 1 and not bar.images
    limits = bar.get_ylim()
    np.testing.assert_allclose(limits, (float(images.min()), float(images.max())), atol=1e-9)
    assert "min to max" in bar.get_ylabel()
    fixed = sample_grid(images, labels, per_class=2, denormalize=lambda x: (x + 1) / 6)
    np.testing.assert_allclose(fixed.axes[-1].get_ylim(), (0.0, 1.0))
    assert fixed.axes[-1].get_ylabel() == "pixel value"
    assert len(sample_grid(images, labels, per_class=2, colorbar=False).axes) == 4
    assert len(sample_grid(images.repeat(1, 3, 1, 1), labels, per_class=2).axes) == 4


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"per_class": 0}, "`per_class`"),
        ({"cmap": "no-such-map"}, "`cmap`"),
        ({"class_names": ["a"]}, "`class_names`"),
        ({"labels": torch.tensor([0, 1])}, "`labels`"),
        ({"images": torch.rand(3, 2, 5, 5)}, "`images`"),
    ],
)
def test_sample_grid_bad_arguments(kwargs, argument):
    pytest.importorskip("matplotlib")
    arguments = {"images": torch.rand(3, 1, 5, 5), "labels": torch.tensor([0, 1, 1])}
    arguments.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=argument):
        sample_grid(**arguments)


# ---------------------------------------------------------------- argument checks


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda m, x, y: label_consistency(m, x, y[:3]), "`labels`"),
        (lambda m, x, y: label_consistency(m, x[0, 0, 0], y), "`images`"),
        (lambda m, x, y: label_consistency("model", x, y), "`model`"),
        (lambda m, x, y: label_consistency(m, x, y, batch_size=0), "`batch_size`"),
        (lambda m, x, y: mean_confidence(m, x, y.double()), "`labels`"),
        (lambda m, x, y: mean_confidence(m, x * float("nan"), y), "`images`"),
        (lambda m, x, y: within_class_diversity(m, None, y), "`images`"),
        (lambda m, x, y: within_class_diversity(m, x, y, feature_layer="nope"), "feature_layer"),
        (lambda m, x, y: within_class_diversity(lambda z: z, x, y), "`source`"),
    ],
)
def test_bad_arguments_name_the_argument(model, images, labels, call, argument):
    with pytest.raises((ValueError, TypeError), match=argument):
        call(model, images, labels)


@pytest.mark.cuda
def test_evaluation_on_cuda_with_autocast(images, labels):
    model = make_tiny_cnn(in_channels=1, num_classes=5, dtype=torch.float32).cuda()
    x = images.float().cuda()
    expected = _eval_logits(model, x).argmax(1).cpu()
    with torch.autocast("cuda", dtype=torch.float16):
        assert label_consistency(model, x, expected) >= 0.9  # half precision may flip ties
        result = within_class_diversity(model, x, labels.cuda())
    assert result.per_class.device.type == "cpu"
    assert mean_confidence(model, images.float(), labels) > 0  # CPU images, CUDA model


def test_old_classifier_keyword_warns_and_works(model, images, labels):
    new = label_consistency(model, images, labels)
    with pytest.warns(DeprecationWarning, match="`classifier` is renamed `model`"):
        assert label_consistency(classifier=model, images=images, labels=labels) == new
    with pytest.warns(DeprecationWarning, match="`classifier` is renamed `model`"):
        mean_confidence(classifier=model, images=images)


def test_evaluation_takes_images_of_another_float_dtype_than_the_model(model, images, labels):
    """float32 images for a float64 model failed inside conv2d ("Input type (float) and bias
    type (double) should be the same"); TIE's own scores cast them, now these do too."""
    model = model.double()
    single = images.float()
    assert label_consistency(model, single, labels) == label_consistency(model, images, labels)
    torch.testing.assert_close(
        mean_confidence(model, single), mean_confidence(model, images), atol=1e-7, rtol=0
    )
    torch.testing.assert_close(
        within_class_diversity(model, single, labels),
        within_class_diversity(model, images, labels),
        atol=1e-6,
        rtol=0,
    )


def test_a_model_of_mixed_dtypes_gets_its_images_as_given():
    """A bfloat16 body with a float32 temperature registered first: the images were cast
    to float32 (the first parameter's dtype) and the body refused them."""

    class Mixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.temperature = torch.nn.Parameter(torch.tensor(1.5))
            self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 5)).to(
                torch.bfloat16
            )

        def forward(self, x):
            return self.body(x).float() / self.temperature

    model = Mixed().eval()
    x = torch.rand(6, 1, 6, 6, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    labels = model(x).argmax(1)
    assert label_consistency(model, x, labels) == 1.0
