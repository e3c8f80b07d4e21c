"""Read-outs formed from log-probabilities and 1 - p on confident models.

Before: `log_softmax` gives the top class ``z_P - logsumexp(z)``, which rounds to exactly 0
from a logit gap of about 17 in float32 (37 in float64) although ``-log1p(S)``,
``S = sum_{j != P} exp(z_j - z_P)``, is representable far beyond: ``log_likelihood`` was 0
for 782 of 1,000 held-out digits of the bundled model x3, ``negative_entropy`` dropped the top
class's term (3-5 % off), VOICE's ``log_likelihood`` was 0 in float64 beyond a gap of 37,
TIE's ``ood_score`` ("max_in", "ue") cancelled to exactly 0, and the introspective features of
an inner layer lost the predicted class's row (its cotangents underflowed in float32).
"""

from __future__ import annotations

import pytest
import torch
from _helpers import make_confident_model

from captum_ext._utils.batched_grad import log_softmax_precise
from captum_ext.attr import VOICE, GradCAM
from captum_ext.inversion.tie import TIE, uncertainty_ue
from captum_ext.metrics import log_likelihood, negative_entropy


def _exact(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 log-probabilities written out per class (the top one as -log1p of the rest)."""
    z = logits.double()
    top = z.argmax(1)
    shifted = z - z.gather(1, top[:, None])
    rest = shifted.exp().scatter(1, top[:, None], 0.0).sum(1, keepdim=True)
    log_p = shifted - torch.log1p(rest)
    return log_p, top


@pytest.fixture(scope="module")
def confident():
    model = make_confident_model(3.0)  # median gap 29 on the sample digits
    from captum_ext.data import load_sample_digits

    images = load_sample_digits()[0]
    with torch.no_grad():
        logits = model(images)
    return model, images, logits


def test_log_softmax_precise_against_the_formula(confident):
    _, _, logits = confident
    expected, _ = _exact(logits)
    got = log_softmax_precise(logits.double(), 1)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    plain = torch.log_softmax(logits.double(), 1).amax(1)
    assert bool((plain == 0).any())  # the case this is for: log_softmax gives exactly 0


def test_log_likelihood_and_negative_entropy_keep_every_digit(confident):
    model, images, logits = confident
    log_p, _ = _exact(logits)
    expected_likelihood = log_p.amax(1)
    expected_entropy = (log_p.exp() * log_p).sum(1)
    got_likelihood = log_likelihood(model, images).double()
    got_entropy = negative_entropy(model, images).double()
    assert bool((got_likelihood < 0).all()) and bool((got_entropy < 0).all())
    torch.testing.assert_close(got_likelihood, expected_likelihood, rtol=1e-4, atol=0)
    torch.testing.assert_close(got_entropy, expected_entropy, rtol=1e-4, atol=0)


def test_voice_log_likelihood_of_a_confident_prediction(confident):
    model, images, logits = confident
    gaps = logits.topk(2, 1).values.diff(dim=1).abs()[:, 0]
    rows = torch.nonzero(gaps > 37).flatten()[:4]  # beyond float64's log_softmax
    assert rows.numel() > 0
    result = VOICE(GradCAM(model, "features.7")).attribute(images[rows])
    log_p, top = _exact(logits[rows])
    expected = log_p.gather(1, top[:, None])[:, 0]
    assert bool((result.log_likelihood < 0).all())
    torch.testing.assert_close(result.log_likelihood, expected, rtol=1e-4, atol=0)


def test_tie_ood_scores_of_confident_inputs_are_not_zero(confident):
    model, images, _ = confident
    small = {
        "generator_steps": 2, "generator_batch_size": 6, "latent_dim": 8,
        "generator_width": 8, "batch_size": 16,
    }  # fmt: skip
    tie = TIE(model, input_shape=(1, 28, 28), **small)
    with torch.no_grad():
        z = tie.model(images).double()
    n = tie.num_classes
    p = torch.softmax(z, 1)
    others = p.scatter(1, z[:, :n].argmax(1, keepdim=True), 0.0)
    expected_max_in = others.sum(1)
    got = tie.ood_score(images, "max_in").double()
    assert bool((got > 0).all())
    torch.testing.assert_close(got, expected_max_in, rtol=1e-4, atol=0)
    k = z.shape[1]
    # UE from its definition, 1 - K/(K-1) sum (p - 1/K)^2, in exact rational-free float64
    # form: K/(K-1) (eps (2 - eps) - sum_{j != top} p_j^2), eps summed from the others
    eps = p.scatter(1, p.argmax(1, keepdim=True), 0.0).sum(1)
    rest = p.scatter(1, p.argmax(1, keepdim=True), 0.0).square().sum(1)
    expected_ue = k / (k - 1) * (eps * (2 - eps) - rest)
    torch.testing.assert_close(tie.ood_score(images, "ue").double(), expected_ue, rtol=1e-4, atol=0)
    # the definition itself on a few plain vectors
    plain = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.7, 0.1, 0.1, 0.1]])
    direct = 1 - (4 / 3) * (plain - 0.25).square().sum(1)
    torch.testing.assert_close(uncertainty_ue(plain), direct)


def test_introspective_features_of_an_inner_layer_keep_the_predicted_row():
    from captum_ext.data import load_sample_digits
    from captum_ext.introspection import introspective_features

    model = make_confident_model(30.0)  # gaps of hundreds: row P is about exp(-gap)
    images = load_sample_digits()[0][:6]
    features = introspective_features(model, images, layer="features.6", form="per_class")
    with torch.no_grad():
        prediction = model(images).argmax(1)
    rows = features.view(6, 10, -1)
    own = rows[torch.arange(6), prediction]
    assert bool((own.abs().amax(1) > 0.05).all())  # unit rows, not zeros
    reference = introspective_features(
        model.double(), images.double(), layer="features.6", form="per_class"
    ).view(6, 10, -1)
    torch.testing.assert_close(rows.double(), reference, rtol=1e-3, atol=1e-4)


def test_grad_cam_plus_plus_weights_of_tiny_gradients():
    """alpha = g^2 / (2 g^2 + sum(A) g^3) squared gradients below 1e-19 to 0 in float32 (the
    maps of a confident prediction's own class were all zero); 1 / (2 + sum(A) g) is the
    same where g != 0."""
    from captum_ext.attr._cam import gradcam_plus_plus_weights

    generator = torch.Generator().manual_seed(0)
    activations = torch.rand(2, 3, 4, 4, generator=generator)
    for scale in (1.0, 1e-23):
        gradients = torch.randn(2, 1, 3, 4, 4, generator=generator) * scale
        g, a = gradients.double(), activations.double()
        sums = a.sum(dim=(2, 3))[:, None, :, None, None]
        alpha = g.square() / (2 * g.square() + sums * g.pow(3))
        expected = (alpha * torch.relu(g)).sum(dim=(3, 4))
        got = gradcam_plus_plus_weights(gradients, activations).double()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
        assert bool((got > 0).any())


def test_contrastive_deeplift_of_the_confident_class_itself():
    """DeepLift's paired backward formed 1 - p~_P by subtraction, which cancels when input and
    baseline both predict P: float32 maps were 100-200 % off the float64 ones (a sum of 0
    where -1.7e-5 was due)."""
    from captum.attr import DeepLift

    from captum_ext.attr import Contrastive
    from captum_ext.data import load_sample_digits

    images = load_sample_digits()[0][4:8]
    model32, model64 = make_confident_model(30.0), make_confident_model(30.0, torch.float64)
    with torch.no_grad():
        own = model64(images.double()).argmax(1)
        assert bool((model64(torch.zeros_like(images).double()).argmax(1) == own).all())
    maps32 = Contrastive(DeepLift, model32).attribute(images, contrast=own)
    maps64 = Contrastive(DeepLift, model64).attribute(images.double(), contrast=own)
    for got, want in zip(maps32.double(), maps64):
        assert float((got - want).abs().max() / want.abs().max()) < 1e-4
