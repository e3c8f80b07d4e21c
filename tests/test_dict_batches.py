"""DataLoaders of dicts (Hugging Face datasets, image processors: ``pixel_values`` and
``labels``) wherever a method reads the user's batches: each gives what the same data as
``(inputs, labels)`` tuples gives. ``score_dataset`` is checked in ``test_score_dataset.py``."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from captum_ext._utils.batches import dict_batch
from captum_ext.attr import LayerIBA
from captum_ext.attr._activation_matching_training import batch_inputs
from captum_ext.introspection import IntrospectiveNetwork


def _loaders(images, labels, batch_size=8):
    pairs = DataLoader(list(zip(images, labels)), batch_size=batch_size)
    dicts = DataLoader(
        [{"pixel_values": x, "labels": y, "id": i} for i, (x, y) in enumerate(zip(images, labels))],
        batch_size=batch_size,
    )
    return pairs, dicts


def test_dict_batch_reads_the_named_keys_and_names_the_argument():
    x, y = torch.zeros(2, 3), torch.tensor([0, 1])
    inputs, labels = dict_batch({"image": x, "label": y, "meta": "a"}, "data")
    assert inputs is x and labels is y
    assert dict_batch({"inputs": x}, "data")[1] is None
    with pytest.raises(ValueError, match=r"`data` yields dicts with keys \['x'\]"):
        dict_batch({"x": x}, "data")
    with pytest.raises(ValueError, match="at most one of"):
        dict_batch({"pixel_values": x, "label": y, "labels": y}, "data")
    assert batch_inputs({"pixel_values": x}) is x


def test_layer_iba_estimates_the_same_statistics_from_dicts(
    bundled_model, sample_digits, bundled_cam_layer
):
    images, labels = sample_digits
    pairs, dicts = _loaders(images, labels)
    from_pairs = LayerIBA(bundled_model, bundled_cam_layer)
    from_pairs.estimate(pairs, progress=False)
    from_dicts = LayerIBA(bundled_model, bundled_cam_layer)
    from_dicts.estimate(dicts, progress=False)
    for name in ("mean", "std", "active"):
        torch.testing.assert_close(getattr(from_dicts, name), getattr(from_pairs, name))


def test_introspective_training_set_from_dicts(bundled_model, sample_digits):
    images, labels = sample_digits
    pairs, dicts = _loaders(images[:16], labels[:16])
    network = IntrospectiveNetwork(bundled_model)
    features, targets, _ = network._training_set(pairs, None)
    dict_features, dict_targets, _ = network._training_set(dicts, None)
    torch.testing.assert_close(dict_features, features)
    assert torch.equal(dict_targets, targets)
    unlabelled = DataLoader([{"pixel_values": x} for x in images[:4]], batch_size=2)
    with pytest.raises(ValueError, match="without labels"):
        network._training_set(unlabelled, None)
