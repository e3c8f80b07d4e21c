"""Audit 41: LayerIBA (train-mode batch norm, the blind-bottleneck warning, a callable loss
without `target`), finer_cam.comparison_classes' arguments, introspection on a train-mode
model (BatchNorm1d, dropout and the caller's random state) and float labels in the report
sections."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from captum_ext.attr import LayerIBA
from captum_ext.attr.finer_cam import comparison_classes
from captum_ext.introspection import IntrospectiveNetwork, introspective_features


def _iba_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "LayerIBA" in str(w.message)]


# ---------------------------------------------------------------- LayerIBA


def test_iba_warns_of_a_batch_norm_in_train_mode():
    """A train-mode batch norm normalises the N x n_noise noisy copies together: the maps of
    a batch are not those of its examples explained alone, and the user is told; in eval
    mode nothing is said."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
        nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3),
    ).train()  # fmt: skip
    iba = LayerIBA(model, "2")
    iba.estimate(torch.randn(20, 1, 4, 4))
    x = torch.randn(2, 1, 4, 4)
    with pytest.warns(UserWarning, match="batch norm of the model normalises") as caught:
        iba.attribute(x, target=1, steps=2, n_noise=2, generator=0)
    assert caught[0].filename == __file__
    assert model.training  # the model comes back as it went in
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        iba.attribute(x, target=1, steps=2, n_noise=2, generator=0)


def test_iba_warns_of_a_batch_norm_without_running_statistics():
    """``track_running_stats=False`` normalises with the batch's statistics in eval mode too,
    so the noisy copies of a batch are normalised together there as well."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
        nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3),
    ).eval()  # fmt: skip
    iba = LayerIBA(model, "2")
    iba.estimate(torch.randn(20, 1, 4, 4))
    x = torch.randn(2, 1, 4, 4)
    with pytest.warns(UserWarning, match="track_running_stats=False"):
        iba.attribute(x, target=1, steps=2, n_noise=2, generator=[0, 1])
    assert not model.training


class _Quadrant(nn.Module):
    """Class 0's logit is ``gain`` x the mean of the layer's top-left quadrant: a confident
    model whose cross-entropy underflows on the clean input (in float32) but not once the
    bottleneck has added noise."""

    def __init__(self, gain: float) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.gain = gain
        with torch.no_grad():
            self.conv.weight.fill_(1.0)
            self.conv.bias.zero_()

    def forward(self, x):
        q = self.conv(x)[:, 0, :4, :4].mean((1, 2))
        return torch.stack([self.gain * q, torch.zeros_like(q), -self.gain * q], 1)


def test_iba_does_not_call_a_confident_model_blind():
    """The loss's gradient at the bottleneck is 0 at the first step (the cross-entropy
    underflows) but not later: the maps localise, and no warning says they show only the
    information cost."""
    torch.manual_seed(0)
    model = _Quadrant(200.0)
    iba = LayerIBA(model, "conv")
    iba.estimate(torch.randn(100, 1, 8, 8))
    x = torch.zeros(2, 1, 8, 8)
    x[:, :, :4, :4] = 1.0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bits = iba.attribute(x, target=0, generator=[0, 1])
    assert _iba_warnings(caught) == []
    inside = bits[:, 0, :4, :4].sum((1, 2))
    assert bool((inside > 3 * (bits[:, 0].sum((1, 2)) - inside)).all())


def test_iba_still_warns_when_the_loss_never_depends_on_the_layer():
    """A layer the output does not read: zero gradient at every step, so the warning stays."""

    class Ignoring(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3, padding=1)
            self.fc = nn.Linear(16, 3)

        def forward(self, x):
            return self.fc(x.flatten(1)) + 0 * self.conv(x).sum()

    torch.manual_seed(0)
    model = Ignoring()
    iba = LayerIBA(model, "conv")
    iba.estimate(torch.randn(10, 1, 4, 4))
    with pytest.warns(UserWarning, match="exactly zero.*does not depend"):
        iba.attribute(torch.randn(2, 1, 4, 4), target=0, steps=4, n_noise=2, generator=0)


def test_iba_callable_loss_without_target_explains_the_predicted_class():
    """As documented, ``target=None`` explains the predicted class also with a ``loss=``
    callable (the non-saturating negative logit the blind warning suggests)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(64, 5),
    ).eval()  # fmt: skip
    iba = LayerIBA(model, "2")
    iba.estimate(torch.randn(20, 1, 4, 4))
    x = torch.randn(3, 1, 4, 4)
    columns = []

    def negative_logit(out, clean, cols):
        columns.append(cols)
        return -out.gather(1, cols[:, None])[:, 0]

    got = iba.attribute(x, loss=negative_logit, steps=3, n_noise=2, generator=0)
    predicted = model(x).argmax(1)
    assert torch.equal(columns[0], predicted.repeat_interleave(2))
    want = iba.attribute(x, target=predicted, loss=negative_logit, steps=3, n_noise=2, generator=0)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_iba_mse_without_target_is_still_refused_on_several_outputs():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(32, 3))
    iba = LayerIBA(model, "0")
    iba.estimate(torch.randn(10, 1, 4, 4))
    with pytest.raises(ValueError, match="`target` is required for a regression loss"):
        iba.attribute(torch.randn(2, 1, 4, 4), loss="mse", steps=2, n_noise=2)


# ---------------------------------------------------------------- comparison_classes


def test_comparison_classes_takes_captums_target_forms():
    logits = torch.tensor([[5.0, 1.0, 4.0, 4.5], [0.0, 3.0, 2.9, -1.0], [1.0, 2.0, 3.0, 4.0]])
    tensor = comparison_classes(logits, torch.tensor([0, 1, 2]))
    assert torch.equal(comparison_classes(logits, [0, 1, 2]), tensor)
    twos = torch.full((3,), 2)
    assert torch.equal(comparison_classes(logits, 2), comparison_classes(logits, twos))
    assert torch.equal(comparison_classes(logits, -1), comparison_classes(logits, [3, 3, 3]))
    assert torch.equal(comparison_classes(logits), comparison_classes(logits, logits.argmax(1)))
    assert comparison_classes(logits, 0, (0, 3)).tolist() == [[0, 1], [0, 1], [0, 3]]


@pytest.mark.parametrize(
    "target, positions, error, pattern",
    [
        (None, (7,), ValueError, r"`positions` \(7,\) reach beyond the model's 4 classes"),
        (None, (4,), ValueError, "`positions`"),
        (None, (), ValueError, "`positions` is empty"),
        (None, (-1,), ValueError, "`positions`"),
        (None, "12", TypeError, "`positions`"),
        (9, None, ValueError, "`target`"),
        ([0, 1], None, ValueError, "`target`"),
        (torch.tensor([0.0, 1.0, 2.0]), None, TypeError, "`target`"),
        ([[0, 1]] * 3, None, ValueError, "`target`"),
    ],
)
def test_comparison_classes_checks_its_arguments(target, positions, error, pattern):
    logits = torch.randn(3, 4)
    with pytest.raises(error, match=pattern):
        comparison_classes(logits, target, positions)


# ---------------------------------------------------------------- introspection


def _state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_introspection_on_a_train_mode_model_with_batchnorm1d():
    """The model takes the batch in train mode; the lookup of its final linear layer and the
    class count of ``fit`` no longer run it on one example (which BatchNorm1d refuses), and
    the model comes back as it went in."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).train()
    x, y = torch.randn(12, 5), torch.randint(0, 3, (12,))
    before = _state(model)
    features = introspective_features(model, x)
    assert features.shape == (12, 3 * 3 * 8)
    torch.testing.assert_close(features, introspective_features(model, x, layer=model[3]))
    network = IntrospectiveNetwork(model, hidden_width=8).fit(x, y, epochs=1, progress=False)
    assert network.head[4].out_features == 3
    assert model.training and all(torch.equal(before[k], v) for k, v in _state(model).items())


def test_fit_leaves_the_callers_random_state_with_train_mode_dropout():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3))
    x, y = torch.randn(12, 5), torch.randint(0, 3, (12,))
    before = torch.get_rng_state()
    IntrospectiveNetwork(model, hidden_width=8).fit(x, y, epochs=1, progress=False, seed=0)
    assert torch.equal(before, torch.get_rng_state())


def test_fit_still_counts_classes_and_refuses_labels_beyond_them():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.randn(6, 5)
    batches = [(x[:4], torch.tensor([0, 1, 2, 0])), (x[4:], torch.tensor([1, 2]))]
    network = IntrospectiveNetwork(model, hidden_width=8).fit(batches, epochs=1, progress=False)
    assert network.head[4].out_features == 3
    with pytest.raises(ValueError, match=r"`labels` must be class indices in \[0, 2\]"):
        IntrospectiveNetwork(model, hidden_width=8).fit(
            x, torch.tensor([0, 1, 2, 3, 0, 1]), epochs=1, progress=False
        )


# ---------------------------------------------------------------- report labels


@pytest.fixture(scope="module")
def fitted():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(81, 3)).eval()
    x = torch.rand(6, 1, 9, 9)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    return IntrospectiveNetwork(model, hidden_width=8).fit(x, y, epochs=1, progress=False), x, y


@pytest.mark.parametrize(
    "labels",
    [
        [0.7, 1.7, 2.7, 0.7, 1.7, 2.7],
        [-0.9] * 6,
        torch.tensor([0.0, 1.0, 2.0, 0.0, 1.0, 2.0]),  # float labels, as fit refuses them
        [True, False, None, 0, 1, 2],
    ],
)
def test_report_sections_refuse_float_labels(fitted, labels):
    from captum_ext.viz.introspection import compute_introspection

    network, x, _ = fitted
    with pytest.raises(
        TypeError,
        match=r"`labels`(\[0\] must be an integer class index| must hold integer class indices)",
    ):
        compute_introspection(network, x, labels=labels)


def test_report_sections_keep_integer_labels_and_none(fitted):
    import numpy as np

    from captum_ext.viz.introspection import compute_introspection

    network, x, y = fitted
    assert compute_introspection(network, x, labels=y).labels.tolist() == y.tolist()
    given = [0, np.int64(1), None, torch.tensor(0), 1, 2]
    kept = compute_introspection(network, x, labels=given).labels.tolist()
    assert kept == [0, 1, -1, 0, 1, 2]
