"""captum_ext.inversion.audits: shortcut datasets, the shortcut audit and the privacy audit."""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import assert_model_unchanged, make_tiny_cnn, model_snapshot
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from captum_ext.inversion.audits import privacy_audit, shortcut_audit, shortcut_dataset
from captum_ext.inversion.evaluation import label_consistency, matched_ssim


def _digits_like(n=30, num_classes=10, side=28, channels=1, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(n, channels, side, side, generator=generator) * 0.5
    labels = torch.arange(n) % num_classes
    return images, labels


def _grid_corner(k, num_classes, height, width, size):
    """The documented default layout, written out independently."""
    g = math.ceil(math.sqrt(num_classes))
    return (
        round((k // g) * (height - size) / (g - 1)),
        round((k % g) * (width - size) / (g - 1)),
    )


# ---------------------------------------------------------------- shortcut_dataset


def test_position_square_exactly_where_documented_rest_untouched():
    images, labels = _digits_like()
    cued = shortcut_dataset(TensorDataset(images, labels), "position", size=4, value=3.0)
    assert cued.num_classes == 10  # inferred from the labels
    corners = [_grid_corner(k, 10, 28, 28, 4) for k in range(10)]
    assert cued.positions.tolist() == [list(c) for c in corners]
    assert sorted({r for r, _ in corners}) == [0, 8, 16]
    assert sorted({c for _, c in corners}) == [0, 8, 16, 24]
    for i in range(len(cued)):
        image, label = cued[i]
        assert int(label) == int(labels[i])
        r, c = corners[int(label)]
        mask = torch.zeros(28, 28, dtype=torch.bool)
        mask[r : r + 4, c : c + 4] = True
        assert bool((image[0][mask] == 3.0).all())
        assert torch.equal(image[0][~mask], images[i, 0][~mask])
    assert torch.equal(cued.dataset.tensors[0], images)  # the original is not modified


def test_position_default_value_is_image_max_on_every_channel():
    images, labels = _digits_like(n=8, num_classes=4, side=10, channels=3)
    cued = shortcut_dataset(TensorDataset(images, labels), size=2, num_classes=4)
    for i in range(len(cued)):
        image, label = cued[i]
        r, c = _grid_corner(int(label), 4, 10, 10, 2)
        assert bool((image[:, r : r + 2, c : c + 2] == images[i].max()).all())


def test_intensity_offsets_everywhere():
    images, labels = _digits_like(n=12, num_classes=4, side=6)
    cued = shortcut_dataset(TensorDataset(images, labels), "intensity", strength=0.3)
    torch.testing.assert_close(
        cued.intensities, torch.tensor([-0.3, -0.1, 0.1, 0.3], dtype=torch.float64)
    )
    for i in range(len(cued)):
        image, label = cued[i]
        offset = cued.intensities[int(label)].item()
        torch.testing.assert_close(image, images[i] + offset)
    explicit = shortcut_dataset(
        TensorDataset(images, labels), "intensity", intensities=[1.0, 2.0, 3.0, 4.0]
    )
    torch.testing.assert_close(explicit[2][0], images[2] + 3.0)


def test_probability_is_reproducible_and_untouched_items_are_original():
    images, labels = _digits_like(n=200, num_classes=10, side=12)
    data = TensorDataset(images, labels)
    a = shortcut_dataset(data, probability=0.5, seed=3)
    b = shortcut_dataset(data, probability=0.5, seed=3)
    c = shortcut_dataset(data, probability=0.5, seed=4)
    assert torch.equal(a.applied, b.applied)
    assert not torch.equal(a.applied, c.applied)
    assert 60 < int(a.applied.sum()) < 140
    for i in range(len(a)):
        image = a[i][0]
        assert torch.equal(image, b[i][0])
        assert torch.equal(image, images[i]) != bool(a.applied[i])
    assert not bool(shortcut_dataset(data, probability=0.0).applied.any())


def test_conflicting_cues_belong_to_another_class():
    images, labels = _digits_like(n=40, num_classes=5, side=9)
    cued = shortcut_dataset(TensorDataset(images, labels), size=3, value=9.0, conflicting=True)
    for i in range(len(cued)):
        image, label = cued[i]
        cue = cued.cue_class(i, int(label))
        assert cue != int(label)
        assert cue == (int(label) + int(cued.cue_offsets[i])) % 5
        r, c = _grid_corner(cue, 5, 9, 9, 3)
        assert bool((image[0, r : r + 3, c : c + 3] == 9.0).all())
        assert int((image == 9.0).sum()) == 9


def test_plain_list_dataset_labels_and_extra_fields_pass_through():
    images, _ = _digits_like(n=4, num_classes=2, side=6)
    items = [(images[i, 0], i % 2, f"id{i}") for i in range(4)]  # H x W images, int labels
    cued = shortcut_dataset(items, positions=[[0, 0], [3, 3]], size=3, value=-1.0)
    image, label, name = cued[3]
    assert label == 1 and name == "id3"
    assert bool((image[3:6, 3:6] == -1.0).all()) and torch.equal(image[:3], images[3, 0, :3])
    batch = next(iter(DataLoader(cued, batch_size=4)))
    assert batch[0].shape == (4, 6, 6)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"kind": "colour"}, "`kind`"),
        ({"probability": 1.5}, "`probability`"),
        ({"size": 20}, "`size`"),
        ({"size": 0}, "`size`"),
        ({"positions": [[0, 0]]}, "`positions`"),
        ({"positions": [[0, 0], [5, 5]]}, "`positions`"),
        ({"num_classes": 0}, "`num_classes`"),
        ({"value": float("nan")}, "`value`"),
        ({"kind": "intensity", "intensities": [1.0]}, "`intensities`"),
        ({"seed": 1.5}, "`seed`"),
        ({"dataset": 5}, "`dataset`"),
        ({"dataset": [(1, 2)]}, "`dataset`"),
    ],
)
def test_shortcut_dataset_bad_arguments(kwargs, argument):
    images, labels = _digits_like(n=4, num_classes=2, side=6)
    arguments = {"dataset": TensorDataset(images, labels), "size": 2}
    arguments.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=argument):
        shortcut_dataset(**arguments)


def test_label_out_of_range_names_num_classes():
    images, labels = _digits_like(n=4, num_classes=4, side=6)
    cued = shortcut_dataset(TensorDataset(images, labels), num_classes=2, size=2)
    with pytest.raises(ValueError, match="`num_classes`"):
        cued[3]


# ---------------------------------------------------------------- shortcut_audit


def _train_linear(dataset, num_classes, side, seed=0, steps=60):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(side * side, num_classes))
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    y = torch.stack([torch.as_tensor(dataset[i][1]) for i in range(len(dataset))])
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    for p in model.parameters():
        p.grad = None
    return model.eval()


def _hand_inject(image, corner, size, value):
    out = image.clone()
    r, c = corner
    out[..., r : r + size, c : c + size] = value
    return out


def test_shortcut_audit_detects_a_model_that_learned_the_cue():
    side, k = 8, 4
    generator = torch.Generator().manual_seed(0)
    # noise images: the label is in the cue only
    train_x = torch.rand(240, 1, side, side, generator=generator) * 0.5
    train_y = torch.randint(0, k, (240,), generator=generator)
    test_x = torch.rand(80, 1, side, side, generator=generator) * 0.5
    test_y = torch.randint(0, k, (80,), generator=generator)
    cued = shortcut_dataset(TensorDataset(train_x, train_y), size=2, value=1.0, seed=1)
    model = _train_linear(cued, k, side)
    before = model_snapshot(model)
    audit = shortcut_audit(model, TensorDataset(test_x, test_y), cued, seed=5)
    assert_model_unchanged(model, before)
    assert audit.samples is None and audit.cue_response is None

    # the same numbers computed by hand from the documented layout
    corners = [_grid_corner(c, k, side, side, 2) for c in range(k)]
    with torch.no_grad():
        clean = model(test_x).argmax(1)
        own = torch.stack(
            [_hand_inject(x, corners[int(y)], 2, 1.0) for x, y in zip(test_x, test_y)]
        )
        conflicting = shortcut_dataset(
            TensorDataset(test_x, test_y), size=2, value=1.0, conflicting=True, seed=5
        )
        cue = (test_y + conflicting.cue_offsets) % k
        assert bool((cue != test_y).all())
        other = torch.stack([_hand_inject(x, corners[int(c)], 2, 1.0) for x, c in zip(test_x, cue)])
        pred_own, pred_other = model(own).argmax(1), model(other).argmax(1)
    assert audit.accuracy_clean == pytest.approx(float((clean == test_y).double().mean()))
    assert audit.accuracy_shortcut == pytest.approx(float((pred_own == test_y).double().mean()))
    assert audit.accuracy_conflicting == pytest.approx(
        float((pred_other == test_y).double().mean())
    )
    assert audit.follows_cue == pytest.approx(float((pred_other == cue).double().mean()))
    # and the audit tells the story: the model follows the cue, not the (absent) shape
    assert audit.accuracy_shortcut > 0.9
    assert audit.follows_cue > 0.9
    assert audit.accuracy_clean < 0.6


def test_shortcut_audit_cue_response_of_inverted_samples():
    side, k, per_class = 8, 4, 3
    images, labels = _digits_like(n=8, num_classes=k, side=side)
    cued = shortcut_dataset(TensorDataset(images, labels), size=2, value=1.0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(side * side, k)).eval()

    def paints_cue(requested):
        out = torch.zeros(len(requested), 1, side, side)
        for i, c in enumerate(requested.tolist()):
            r, col = cued.positions[c].tolist()
            out[i, :, r : r + 2, col : col + 2] = 1.0
        return out

    audit = shortcut_audit(
        model,
        TensorDataset(images, labels),
        cued,
        inversion=paints_cue,
        samples_per_class=per_class,
    )
    assert audit.sample_labels.tolist() == sum([[c] * per_class for c in range(k)], [])
    torch.testing.assert_close(audit.cue_response, torch.ones(k, dtype=torch.float64))
    flat = shortcut_audit(
        model,
        TensorDataset(images, labels),
        cued,
        inversion=lambda requested: torch.full((len(requested), 1, side, side), 0.2),
    )
    torch.testing.assert_close(flat.cue_response, torch.zeros(k, dtype=torch.float64))

    table = torch.tensor([0.0, 1.0, 2.0, 5.0])
    intensities = {"kind": "intensity", "intensities": table.tolist(), "num_classes": k}
    audit = shortcut_audit(  # samples of class c have constant intensity table[c]
        model,
        TensorDataset(images, labels),
        intensities,
        inversion=lambda requested: table[requested].view(-1, 1, 1, 1).expand(-1, 1, side, side),
    )
    torch.testing.assert_close(
        audit.cue_response, torch.tensor([-2.0, -1.0, 0.0, 3.0], dtype=torch.float64)
    )


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"shortcuts": "position"}, "`shortcuts`"),
        ({"shortcuts": {"kind": "position", "probability": 0.5}}, "`shortcuts`"),
        ({"samples_per_class": 0}, "`samples_per_class`"),
        ({"batch_size": -1}, "`batch_size`"),
        ({"inversion": 3}, "`inversion`"),
        ({"inversion": lambda y: torch.zeros(2, 1, 6, 6)}, "`inversion`"),
        ({"model": None}, "`model`"),
    ],
)
def test_shortcut_audit_bad_arguments(kwargs, argument):
    images, labels = _digits_like(n=4, num_classes=2, side=6)
    arguments = {
        "model": nn.Sequential(nn.Flatten(), nn.Linear(36, 2)),
        "test_dataset": TensorDataset(images, labels),
        "shortcuts": {"kind": "position", "size": 2},
    }
    arguments.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=argument):
        shortcut_audit(**arguments)


# ---------------------------------------------------------------- privacy_audit


def test_privacy_audit_with_memorised_training_images():
    images, labels = _digits_like(n=9, num_classes=3, side=9, seed=2)
    model = make_tiny_cnn(in_channels=1, num_classes=3, dtype=torch.float32)
    before = model_snapshot(model)

    def leaks(requested):  # returns training images of the requested classes, in order
        rows = [torch.nonzero(labels == c).flatten() for c in range(3)]
        seen = [0, 0, 0]
        out = []
        for c in requested.tolist():
            out.append(images[rows[c][seen[c]]])
            seen[c] += 1
        return torch.stack(out)

    audit = privacy_audit(
        model, images, labels, inversion=leaks, samples_per_class=3, data_range=1.0, progress=False
    )
    assert_model_unchanged(model, before)
    assert audit.sample_labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert audit.matched.mean == pytest.approx(1.0)
    assert audit.matched.share_above == 1.0
    assert audit.label_consistency == pytest.approx(
        label_consistency(model, audit.samples, audit.sample_labels)
    )
    only = privacy_audit(
        model,
        images,
        labels,
        inversion=leaks,
        classes=[2],
        samples_per_class=2,
        data_range=1.0,
        progress=False,
    )
    assert set(only.matched.labels.tolist()) == {2} and len(only.matched.ssim) == 2


def test_privacy_audit_trains_a_reconstruction_inversion():
    pytest.importorskip("captum_ext.inversion.trainer")
    images, labels = _digits_like(n=12, num_classes=3, side=8, seed=3)
    model = make_tiny_cnn(in_channels=1, num_classes=3, dtype=torch.float32)
    model.train()
    before = model_snapshot(model)
    audit = privacy_audit(
        model,
        images,
        labels,
        steps=2,
        batch_size=8,
        samples_per_class=2,
        data_range=1.0,
        seed=1,
        progress=False,
    )
    assert_model_unchanged(model, before)
    assert audit.inversion.preset == "reconstruction"
    assert len(audit.inversion.history["step"]) == 2
    assert audit.samples.shape == (6, 1, 8, 8)
    torch.testing.assert_close(
        audit.samples, audit.inversion.sample(audit.sample_labels, generator=1)
    )
    again = matched_ssim(
        audit.samples, images, audit.sample_labels, labels, data_range=1.0, progress=False
    )
    torch.testing.assert_close(audit.matched.ssim, again.ssim)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"samples_per_class": 0}, "`samples_per_class`"),
        ({"training_labels": torch.tensor([0, 1])}, "`training_labels`"),
        ({"classes": []}, "`classes`"),
        ({"steps": 0, "inversion": None}, "`steps`"),
        (
            {"inversion_options": {"preset": "counterfeit"}, "inversion": None},
            "`inversion_options`",
        ),
        ({"threshold": 3.0}, "`threshold`"),
        ({"seed": "zero"}, "`seed`"),
    ],
)
def test_privacy_audit_bad_arguments(kwargs, argument):
    images, labels = _digits_like(n=6, num_classes=3, side=8)
    arguments = {
        "model": make_tiny_cnn(in_channels=1, num_classes=3, dtype=torch.float32),
        "training_images": images,
        "training_labels": labels,
        "inversion": lambda y: images[: len(y)],
        "samples_per_class": 2,
        "progress": False,
    }
    arguments.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=argument):
        privacy_audit(**arguments)


@pytest.mark.cuda
def test_audits_on_cuda_with_autocast():
    images, labels = _digits_like(n=12, num_classes=3, side=8, seed=4)
    model = make_tiny_cnn(in_channels=1, num_classes=3, dtype=torch.float32).cuda()
    before = model_snapshot(model)
    cued = shortcut_dataset(TensorDataset(images, labels), size=2, value=1.0)
    with torch.autocast("cuda", dtype=torch.float16):
        audit = shortcut_audit(model, TensorDataset(images, labels), cued)
        privacy = privacy_audit(
            model,
            images.cuda(),
            labels,
            inversion=lambda requested: images[: len(requested)].cuda(),
            samples_per_class=2,
            data_range=1.0,
            progress=False,
        )
    assert_model_unchanged(model, before)
    assert 0.0 <= audit.accuracy_shortcut <= 1.0
    assert privacy.samples.device.type == "cuda"
    expected = matched_ssim(
        images[:6], images, privacy.sample_labels, labels, data_range=1.0, progress=False
    )
    torch.testing.assert_close(privacy.matched.ssim, expected.ssim)


def test_audits_old_keywords_warn_and_work():
    images, labels = _digits_like(n=6, num_classes=3, side=8)
    model = make_tiny_cnn(in_channels=1, num_classes=3, dtype=torch.float32)
    options = {
        "inversion": lambda y: images[: len(y)],
        "samples_per_class": 2,
        "progress": False,
    }
    new = privacy_audit(model, images, labels, **options)
    with pytest.warns(DeprecationWarning, match="`classifier` is renamed `model`"):
        old = privacy_audit(
            classifier=model, training_images=images, training_labels=labels, **options
        )
    torch.testing.assert_close(old.matched.ssim, new.matched.ssim)
    with pytest.warns(DeprecationWarning, match="`classifier` is renamed `model`"):
        audit = shortcut_audit(
            classifier=model,
            test_dataset=TensorDataset(images, labels),
            shortcuts={"kind": "position", "size": 2},
        )
    assert 0.0 <= audit.accuracy_shortcut <= 1.0


def test_shortcut_audit_leaves_the_callers_rng_and_privacy_audit_names_classes(
    bundled_model, sample_digits
):
    """shortcut_audit(seed=...) advanced the caller's global RNG three times (its DataLoaders
    drew worker seeds from it); privacy_audit(classes=[12]) on a 10-class model said
    "`labels` must lie in 0..9" from inside the conditioning."""
    from captum_ext.bundled import load_bundled_inversion

    side, k = 8, 4
    generator = torch.Generator().manual_seed(0)
    train_x = torch.rand(40, 1, side, side, generator=generator) * 0.5
    train_y = torch.randint(0, k, (40,), generator=generator)
    cued = shortcut_dataset(TensorDataset(train_x, train_y), size=2, value=1.0, seed=1)
    model = _train_linear(cued, k, side)
    torch.manual_seed(7)
    expected = torch.rand(2)
    torch.manual_seed(7)
    shortcut_audit(model, TensorDataset(train_x, train_y), cued, seed=5)
    assert torch.equal(torch.rand(2), expected)
    images, labels = sample_digits
    with pytest.raises(ValueError, match=r"`classes` holds 12, but the model has 10 classes"):
        inversion = load_bundled_inversion(bundled_model)
        privacy_audit(
            bundled_model, images[:10], labels[:10], inversion=inversion, classes=[12],
            progress=False,
        )  # fmt: skip


@pytest.mark.parametrize(
    "setting",
    [
        {"steps": 10},
        {"preprocess": lambda x: x},
        {"value_range": (0.0, 255.0)},
        {"batch_size": 4},
        {"inversion_options": {"lr": 0.1}},
    ],
)
def test_privacy_audit_refuses_training_settings_with_a_fitted_inversion(setting):
    """With `inversion=` given they were accepted and ignored."""
    images, labels = _digits_like(n=6, num_classes=3, side=9, seed=2)
    model = make_tiny_cnn(in_channels=1, num_classes=3, dtype=torch.float32)
    name = next(iter(setting))
    with pytest.raises(ValueError, match=f"`{name}`=.* would be ignored"):
        privacy_audit(model, images, labels, inversion=lambda y: images[: len(y)], **setting)


def test_privacy_audit_takes_default_values_in_other_forms_with_an_inversion():
    """An empty `inversion_options` and `value_range=[0.0, 1.0]` lose nothing, yet were
    refused."""
    images, labels = _digits_like(n=6, num_classes=3, side=9, seed=2)
    model = make_tiny_cnn(in_channels=1, num_classes=3, dtype=torch.float32)
    audit = privacy_audit(
        model,
        images,
        labels,
        inversion=lambda y: images[: len(y)],
        inversion_options={},
        value_range=[0.0, 1.0],
        samples_per_class=1,
        progress=False,
    )
    assert audit.samples.shape[0] == 3
