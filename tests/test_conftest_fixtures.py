"""The shared fixtures of tests/conftest.py hand out copies: a test that changes its model or
images cannot change another test's."""

from __future__ import annotations

import torch


def test_bundled_model_fixtures_are_copies_in_eval_mode(bundled_model, fresh_bundled_model):
    assert not bundled_model.training and not fresh_bundled_model.training
    assert bundled_model is not fresh_bundled_model
    first = next(fresh_bundled_model.parameters())
    with torch.no_grad():
        first.add_(1.0)
    assert not torch.equal(first, next(bundled_model.parameters()))


def test_fresh_bundled_model_is_new_for_each_test(fresh_bundled_model, bundled_model):
    # the previous test changed its fresh copy; this one is the original again
    for mine, shared in zip(fresh_bundled_model.parameters(), bundled_model.parameters()):
        assert torch.equal(mine, shared)


def test_sample_digits_are_copies(sample_digits, bundled_digits, bundled_cam_layer):
    images, labels = sample_digits
    assert images.shape == (40, 1, 28, 28) and labels.shape == (40,)
    images.zero_()
    assert bundled_digits[0].abs().sum() > 0
    assert bundled_cam_layer == "features.7"
