"""Inversion building blocks: conditioning, the generator, each loss against a direct
computation on tiny tensors, and the penultimate-feature lookup."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from _helpers import assert_model_unchanged, make_tiny_cnn, model_snapshot
from torch import nn

from captum_ext.data import normalize_digits
from captum_ext.inversion import (
    CONDITIONINGS,
    ConditionedGenerator,
    cosine_diversity,
    cross_entropy_to_labels,
    feature_orthogonality,
    hot_matrices,
    kl_to_conditioning,
    one_hot_vectors,
    perturbed_kl_ce,
    pixel_range,
    soft_vectors,
    total_variation,
    vector_matrix,
    weight_gradient_norm,
)
from captum_ext.inversion._features import _feature_tap, final_linear

D = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- conditioning
def test_soft_vectors_are_softmax_of_normal_draws():
    c = soft_vectors(5, 7, generator=gen(3), dtype=D)
    r = torch.randn(5, 7, generator=gen(3), dtype=D)
    torch.testing.assert_close(c, torch.softmax(r, 1))
    assert torch.allclose(c.sum(1), torch.ones(5, dtype=D))
    assert bool((c > 0).all())


def test_soft_vectors_with_labels_swap_the_largest_entry():
    labels = torch.tensor([0, 3, 3, 6, 1, 2])
    c = soft_vectors(0, 7, labels=labels, generator=gen(4), dtype=D)
    free = soft_vectors(6, 7, generator=gen(4), dtype=D)
    assert torch.equal(c.argmax(1), labels)
    # the same draws, only two entries exchanged per row
    torch.testing.assert_close(c.sort(1).values, free.sort(1).values)
    for i, k in enumerate(labels.tolist()):
        top = int(free[i].argmax())
        expected = free[i].clone()
        expected[[top, k]] = expected[[k, top]]
        torch.testing.assert_close(c[i], expected)


def test_one_hot_and_hot_matrices_by_hand():
    labels = torch.tensor([2, 0, 4])
    assert torch.equal(one_hot_vectors(labels, 5), torch.eye(5)[labels])
    m = hot_matrices(labels, 5)
    assert m.shape == (3, 1, 5, 5)
    for i, k in enumerate(labels.tolist()):
        for r, c in itertools.product(range(5), range(5)):
            assert m[i, 0, r, c] == float(r == k or c == k)
        assert m[i].sum() == 2 * 5 - 1


def test_vector_matrix_is_consistent():
    vectors, matrices, labels = vector_matrix(9, 6, generator=gen(0))
    assert vectors.shape == (9, 6) and matrices.shape == (9, 1, 6, 6)
    assert torch.equal(labels, vectors.argmax(1))
    assert torch.equal(matrices, hot_matrices(labels, 6))
    again = vector_matrix(9, 6, generator=gen(0))
    assert torch.equal(again[0], vectors)


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda: soft_vectors(3, 1), "num_classes"),
        (lambda: soft_vectors(-1, 4), "n"),
        (lambda: one_hot_vectors(torch.tensor([4]), 4), "labels"),
        (lambda: hot_matrices(torch.tensor([[1]]), 4), "labels"),
        (lambda: hot_matrices(torch.tensor([0.5]), 4), "labels"),
        (lambda: vector_matrix(2, 4, labels=torch.tensor([-1])), "labels"),
    ],
)
def test_conditioning_errors_name_the_argument(call, argument):
    with pytest.raises((ValueError, TypeError), match=f"`{argument}`"):
        call()


# ----------------------------------------------------------------------------- generator
@pytest.mark.parametrize("num_classes", [2, 10, 37])
@pytest.mark.parametrize("out_shape", [(1, 28, 28), (3, 32, 32), (3, 64, 48)])
def test_generator_shapes_and_normalised_range(num_classes, out_shape):
    mean, std = (0.5, 0.4, 0.3)[: out_shape[0]], (0.2, 0.25, 0.3)[: out_shape[0]]
    torch.manual_seed(0)
    g = ConditionedGenerator(
        num_classes, out_shape, latent_dim=12, width=16, preprocess=(mean, std)
    ).eval()
    labels = torch.arange(5) % num_classes
    with torch.no_grad():
        images, pixels = g.generate(labels, generator=gen(1), return_pixels=True)
    assert images.shape == (5, *out_shape) and pixels.shape == (5, *out_shape)
    assert bool(((pixels >= 0) & (pixels <= 1)).all())
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    torch.testing.assert_close(images, (pixels - m) / s)
    assert bool((images >= -m / s - 1e-6).all() and (images <= (1 - m) / s + 1e-6).all())
    assert pixels.std() > 0  # not a constant image


def test_generator_value_range_feeds_preprocess_its_pixel_scale():
    torch.manual_seed(0)
    g = ConditionedGenerator(
        10, (1, 28, 28), width=16, preprocess=normalize_digits, value_range=(0, 255)
    ).eval()
    with torch.no_grad():
        images, pixels = g.generate(torch.arange(10), generator=gen(0), return_pixels=True)
    torch.testing.assert_close(images, normalize_digits(pixels * 255))
    assert images.min() >= -0.4243 and images.max() <= 2.8216


@pytest.mark.parametrize("conditioning", sorted(CONDITIONINGS))
def test_generator_conditioning_modes(conditioning):
    torch.manual_seed(0)
    g = ConditionedGenerator(
        4, (1, 12, 12), latent_dim=6, conditioning=conditioning, width=8, dropout=0.0
    )  # train mode (batch statistics): a fresh generator's eval-mode outputs are nearly flat
    vectors, matrices = g.conditioning_for(torch.tensor([0, 3]), generator=gen(0))
    kind, uses_matrix = CONDITIONINGS[conditioning]
    assert (vectors is None) == (kind is None)
    assert (matrices is None) == (not uses_matrix)
    if kind == "one_hot":
        assert torch.equal(vectors, torch.eye(4)[[0, 3]])
    if kind == "soft":
        assert torch.equal(vectors.argmax(1), torch.tensor([0, 3]))
        assert not torch.equal(vectors, torch.eye(4)[[0, 3]])
    with torch.no_grad():
        out = g(torch.randn(2, 6, generator=gen(2)), vectors, matrices)
    assert out.shape == (2, 1, 12, 12)
    # the conditioning matters: another class gives another image for the same z
    other = g.conditioning_for(torch.tensor([1, 2]), generator=gen(0))
    with torch.no_grad():
        out2 = g(torch.randn(2, 6, generator=gen(2)), *other)
    assert not torch.allclose(out, out2)


def test_generator_errors_name_the_argument():
    with pytest.raises(ValueError, match="`num_classes`"):
        ConditionedGenerator(1)
    with pytest.raises(ValueError, match="`out_shape`"):
        ConditionedGenerator(3, (28, 28))
    with pytest.raises(ValueError, match="`conditioning`"):
        ConditionedGenerator(3, conditioning="label")
    with pytest.raises(ValueError, match="`dropout`"):
        ConditionedGenerator(3, dropout=1.5)
    with pytest.raises(TypeError, match="`preprocess`"):
        ConditionedGenerator(3, preprocess="imagenet")
    with pytest.raises(ValueError, match="`value_range`"):
        ConditionedGenerator(3, preprocess=lambda p: p, value_range=(1, 0))
    with pytest.raises(ValueError, match="`value_range`"):
        ConditionedGenerator(3, value_range=(0, 255))  # without a preprocess callable
    g = ConditionedGenerator(3, (1, 8, 8), latent_dim=4, width=8)
    with pytest.raises(ValueError, match="`vectors`"):
        g(torch.randn(2, 4), None, hot_matrices(torch.tensor([0, 1]), 3))
    with pytest.raises(ValueError, match="`matrices`"):
        g(torch.randn(2, 4), one_hot_vectors(torch.tensor([0, 1]), 3), None)
    with pytest.raises(ValueError, match="`z`"):
        g(torch.randn(2, 5), None, None)
    with pytest.raises(ValueError, match="`labels`"):
        g.generate(torch.tensor([3]))


# ----------------------------------------------------------------------------- losses
def _logits_and_vectors():
    g = gen(7)
    logits = torch.randn(4, 5, generator=g, dtype=D)
    vectors = torch.softmax(torch.randn(4, 5, generator=g, dtype=D), 1)
    return logits, vectors


def test_kl_to_conditioning_by_hand():
    logits, c = _logits_and_vectors()
    total = 0.0
    for i in range(4):
        z = sum(math.exp(v) for v in logits[i].tolist())
        for k in range(5):
            p = math.exp(float(logits[i, k])) / z
            total += float(c[i, k]) * math.log(float(c[i, k]) / p)
    assert float(kl_to_conditioning(logits, c)) == pytest.approx(total / 4, rel=1e-12)
    # zero when the classifier agrees; the cross-entropy for one-hot targets
    assert float(kl_to_conditioning(logits, torch.softmax(logits, 1))) == pytest.approx(
        0, abs=1e-12
    )
    labels = torch.tensor([1, 0, 4, 2])
    onehot = one_hot_vectors(labels, 5, dtype=D)
    torch.testing.assert_close(
        kl_to_conditioning(logits, onehot), cross_entropy_to_labels(logits, labels)
    )


def test_cross_entropy_by_hand_and_from_vectors():
    logits, c = _logits_and_vectors()
    labels = c.argmax(1)
    expected = -sum(
        float(logits[i, labels[i]]) - math.log(sum(math.exp(v) for v in logits[i].tolist()))
        for i in range(4)
    )
    assert float(cross_entropy_to_labels(logits, labels)) == pytest.approx(expected / 4)
    torch.testing.assert_close(
        cross_entropy_to_labels(logits, c), cross_entropy_to_labels(logits, labels)
    )


def test_cosine_diversity_against_double_loop():
    phi = torch.randn(6, 3, 2, generator=gen(1), dtype=D)
    flat = phi.flatten(1)
    total = 0.0
    for i in range(6):
        for j in range(6):
            if i != j:
                a, b = flat[i], flat[j]
                total += float(a @ b) / (float(a.norm()) * float(b.norm()))
    assert float(cosine_diversity(phi)) == pytest.approx(total / 30, rel=1e-12)
    same = torch.ones(3, 4, dtype=D)
    assert float(cosine_diversity(same)) == pytest.approx(1.0)


def test_class_cosine_diversity_against_double_loop():
    from captum_ext.inversion import class_cosine_diversity

    phi = torch.randn(9, 3, 2, generator=gen(4), dtype=D)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 3, 2, 2])
    flat = phi.flatten(1)
    total, count = 0.0, 0
    for i in range(9):
        for j in range(9):
            if i != j and labels[i] == labels[j]:
                a, b = flat[i], flat[j]
                total += float(a @ b) / (float(a.norm()) * float(b.norm()))
                count += 1
    assert float(class_cosine_diversity(phi, labels)) == pytest.approx(total / count, rel=1e-12)
    # one class: the batch-wide term
    one = torch.zeros(9, dtype=torch.long)
    assert float(class_cosine_diversity(phi, one)) == pytest.approx(float(cosine_diversity(phi)))
    # no pair shares a label: 0, with a gradient (of zeros) for the trainer
    x = phi.clone().requires_grad_(True)
    value = class_cosine_diversity(x, torch.arange(9))
    value.backward()
    assert float(value.detach()) == 0.0 and torch.equal(x.grad, torch.zeros_like(x))
    with pytest.raises(ValueError, match="labels"):
        class_cosine_diversity(phi, labels[:4])


def test_class_cosine_weight_enters_the_inversion_loss():
    from captum_ext.inversion import NetworkInversion

    model = make_tiny_cnn(num_classes=4, dtype=torch.float32)
    generator = ConditionedGenerator(4, (3, 8, 8), latent_dim=8, width=8)
    inversion = NetworkInversion(
        model, generator, weights={"class_cosine": 2.0}, batch_size=8, seed=0
    )
    history = inversion.fit(2, progress=False)
    assert all(0.0 <= v <= 1.0 for v in history["class_cosine"])
    plain = NetworkInversion(
        model, ConditionedGenerator(4, (3, 8, 8), latent_dim=8, width=8), batch_size=8, seed=0
    )
    assert all(math.isnan(v) for v in plain.fit(1, progress=False)["class_cosine"])


def test_feature_orthogonality_against_formula():
    phi = torch.randn(5, 4, generator=gen(2), dtype=D)
    total = 0.0
    for i in range(5):
        for j in range(5):
            cos = float(phi[i] @ phi[j]) / (float(phi[i].norm()) * float(phi[j].norm()))
            total += (cos - (1.0 if i == j else 0.0)) ** 2
    assert float(feature_orthogonality(phi)) == pytest.approx(total / 25, rel=1e-12)
    assert float(feature_orthogonality(torch.eye(4, dtype=D) * 3)) == pytest.approx(0, abs=1e-15)


def test_total_variation_and_pixel_range_by_hand():
    x = torch.randn(2, 3, 4, 5, generator=gen(3), dtype=D)
    vert = [
        (float(x[n, c, h + 1, w]) - float(x[n, c, h, w])) ** 2
        for n in range(2)
        for c in range(3)
        for h in range(3)
        for w in range(5)
    ]
    hori = [
        (float(x[n, c, h, w + 1]) - float(x[n, c, h, w])) ** 2
        for n in range(2)
        for c in range(3)
        for h in range(4)
        for w in range(4)
    ]
    assert float(total_variation(x)) == pytest.approx(sum(vert) / len(vert) + sum(hori) / len(hori))
    values = x.flatten().tolist()
    outside = [(0 - v) ** 2 if v < 0 else (v - 1) ** 2 if v > 1 else 0.0 for v in values]
    assert float(pixel_range(x)) == pytest.approx(sum(outside) / len(values))
    assert float(pixel_range(x.sigmoid())) == 0.0


class LinearSoftmax(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 3).to(D)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.fc(self.drop(x))


def test_weight_gradient_norm_against_closed_form():
    model = LinearSoftmax().train()  # dropout on: the loss must use eval mode
    model.fc.bias.requires_grad_(False)
    before = model_snapshot(model)
    x = torch.randn(5, 4, generator=gen(4), dtype=D)
    y = torch.tensor([0, 2, 1, 1, 0])
    value = weight_gradient_norm(model, x, y)
    # closed form of the softmax regression gradient: dCE/dW = (p - onehot)^T x / N
    with torch.no_grad():
        p = torch.softmax(x @ model.fc.weight.T + model.fc.bias, 1)
        r = (p - F.one_hot(y, 3).to(D)) / 5
        expected = (r.T @ x).pow(2).sum() + r.sum(0).pow(2).sum()
    assert float(value.detach()) == pytest.approx(float(expected), rel=1e-10)
    assert float(weight_gradient_norm(model, x, y, squared=False).detach()) == pytest.approx(
        math.sqrt(float(expected)), rel=1e-10
    )
    assert_model_unchanged(model, before)


def test_weight_gradient_norm_is_differentiable_in_the_inputs():
    model = make_tiny_cnn(num_classes=3)
    model.train()
    before = model_snapshot(model)
    x = torch.randn(2, 3, 4, 4, generator=gen(5), dtype=D, requires_grad=True)
    y = torch.tensor([2, 0])

    def reference(inputs):  # written separately with torch.func in float64
        eval_model = make_tiny_cnn(num_classes=3)
        params = dict(eval_model.named_parameters())

        def loss(p):
            logits = torch.func.functional_call(eval_model, p, (inputs,))
            return F.cross_entropy(logits, y)

        grads = torch.func.grad(loss)(params)
        return sum(g.pow(2).sum() for g in grads.values())

    torch.testing.assert_close(weight_gradient_norm(model, x, y), reference(x))
    (ours,) = torch.autograd.grad(weight_gradient_norm(model, x, y), x)
    (theirs,) = torch.autograd.grad(reference(x), x)
    torch.testing.assert_close(ours, theirs)
    assert_model_unchanged(model, before)


def test_weight_gradient_norm_restores_the_model_on_error():
    model = make_tiny_cnn(num_classes=3)
    model.features[0].weight.requires_grad_(False)
    before = model_snapshot(model)
    with pytest.raises(ValueError, match="`labels`"):
        weight_gradient_norm(model, torch.randn(2, 3, 4, 4, dtype=D), torch.tensor([0, 7]))
    assert_model_unchanged(model, before)
    with pytest.raises(TypeError, match="`model`"):
        weight_gradient_norm(lambda x: x, torch.randn(2, 3), torch.tensor([0, 1]))


def test_perturbed_kl_ce_matches_a_direct_computation():
    model = LinearSoftmax().eval()
    pixels = torch.rand(3, 1, 2, 2, generator=gen(6), dtype=D)
    c = torch.softmax(torch.randn(3, 3, generator=gen(7), dtype=D), 1)

    def normalize(p):
        return (p - 0.5) / 0.25

    def classifier(x):
        return model(x.flatten(1))

    value = perturbed_kl_ce(classifier, pixels, c, eps=0.1, preprocess=normalize, generator=gen(8))
    signs = torch.randint(0, 2, pixels.shape, generator=gen(8)).to(D) * 2 - 1
    logits = classifier(normalize(pixels + 0.1 * signs))
    log_p = torch.log_softmax(logits, 1)
    expected = (c * (c.log() - log_p)).sum(1).mean() - log_p[range(3), c.argmax(1)].mean()
    torch.testing.assert_close(value, expected)
    # eps = 0: the clean KL + CE
    clean = perturbed_kl_ce(classifier, pixels, c, eps=0.0, preprocess=normalize, generator=gen(8))
    logits = classifier(normalize(pixels))
    torch.testing.assert_close(
        clean, kl_to_conditioning(logits, c) + cross_entropy_to_labels(logits, c)
    )


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda: kl_to_conditioning(torch.zeros(2, 3), torch.zeros(2, 4)), "conditioning"),
        (lambda: kl_to_conditioning(torch.zeros(3), torch.zeros(3)), "logits"),
        (lambda: cross_entropy_to_labels(torch.zeros(2, 3), torch.tensor([0])), "labels"),
        (lambda: cosine_diversity(torch.zeros(1, 3)), "features"),
        (lambda: feature_orthogonality([[1.0]]), "features"),
        (lambda: total_variation(torch.zeros(2, 3)), "images"),
        (lambda: pixel_range(torch.zeros(1, 1, 2, 2), 1.0, 0.0), "low"),
        (lambda: perturbed_kl_ce(nn.Identity(), torch.zeros(1, 2), torch.ones(1, 2)), "pixels"),
    ],
)
def test_loss_errors_name_the_argument(call, argument):
    with pytest.raises((ValueError, TypeError), match=f"`{argument}`"):
        call()


# ----------------------------------------------------------------------------- features
class NoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3)

    def forward(self, x):
        return self.conv(x).mean((2, 3))


class UnusedLinearLast(nn.Module):
    """The last registered nn.Linear is never called; the features come from `fc`."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(12, 6)
        self.fc = nn.Linear(6, 4)
        self.spare = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(torch.tanh(self.body(x.flatten(1))))


def test_penultimate_features_found_by_forward_hooks():
    model = make_tiny_cnn(num_classes=3)
    x = torch.randn(4, 3, 5, 5, generator=gen(9), dtype=D)
    before = model_snapshot(model)
    tap = _feature_tap(model, None, x, layer_input=None)
    assert tap.layer is model.classifier
    with tap.active():
        logits = model(x)
        phi = tap.pop()
    assert_model_unchanged(model, before)
    torch.testing.assert_close(phi, model.head(model.pool(model.features(x))))
    # the features stay in the graph: d(sum phi)/dx equals a direct computation
    x.requires_grad_(True)
    with tap.active():
        model(x)
        (grad,) = torch.autograd.grad(tap.pop().sum(), x)
    (direct,) = torch.autograd.grad(model.head(model.pool(model.features(x))).sum(), x)
    torch.testing.assert_close(grad, direct)
    assert logits.shape == (4, 3)

    other = UnusedLinearLast()
    assert final_linear(other, torch.zeros(2, 1, 3, 4)) is other.fc


def test_feature_layer_given_and_errors():
    model = make_tiny_cnn(num_classes=3)
    x = torch.randn(2, 3, 5, 5, generator=gen(9), dtype=D)
    tap = _feature_tap(model, "pool", x, layer_input=False)
    with tap.active():
        model(x)
        phi = tap.pop()
    torch.testing.assert_close(phi, model.pool(model.features(x)).flatten(1))
    with pytest.raises(ValueError, match="`feature_layer`"):
        _feature_tap(NoLinear(), None, torch.zeros(2, 3, 5, 5), layer_input=None)
    with pytest.raises(ValueError, match="`feature_layer`"):
        _feature_tap(model, "featurs.3", x, layer_input=False)


# ----------------------------------------------------------------------------- renamed names
def test_generator_old_normalize_keyword_and_attributes_warn_and_work():
    torch.manual_seed(0)
    with pytest.warns(DeprecationWarning, match="`normalize` is renamed `preprocess`"):
        old = ConditionedGenerator(3, (1, 8, 8), latent_dim=4, width=8, normalize=(0.5, 0.25))
    pixels = torch.rand(2, 1, 8, 8, generator=gen(0))
    torch.testing.assert_close(old.preprocess_pixels(pixels), (pixels - 0.5) / 0.25)
    with pytest.warns(DeprecationWarning, match="preprocess_pixels"):
        torch.testing.assert_close(old.normalize_pixels(pixels), (pixels - 0.5) / 0.25)
    with pytest.warns(DeprecationWarning, match="preprocess"):
        assert old.normalize is old.preprocess


def test_loss_old_keywords_warn_and_work():
    model = LinearSoftmax().eval()
    pixels = torch.rand(3, 1, 2, 2, generator=gen(6), dtype=D)
    c = torch.softmax(torch.randn(3, 3, generator=gen(7), dtype=D), 1)

    def forward(x):
        return model(x.flatten(1))

    new = perturbed_kl_ce(forward, pixels, c, preprocess=lambda p: 2 * p, generator=gen(8))
    with pytest.warns(DeprecationWarning, match="renamed"):
        old = perturbed_kl_ce(
            classifier=forward,
            pixels=pixels,
            conditioning=c,
            normalize=lambda p: 2 * p,
            generator=gen(8),
        )
    torch.testing.assert_close(old, new)
