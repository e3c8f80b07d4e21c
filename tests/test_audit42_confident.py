"""Audit 42: confident models (logit gaps of 20 and more) in float32, against float64."""

import copy

import pytest
import torch

from captum_ext.bundled import load_bundled_model
from captum_ext.data import load_sample_digits


def _confident(scale: float) -> torch.nn.Module:
    model = copy.deepcopy(load_bundled_model())
    with torch.no_grad():
        model.classifier.weight.mul_(scale)
        model.classifier.bias.mul_(scale)
    return model.eval()


@pytest.mark.parametrize("method", ["Occlusion", "FeatureAblation"])
def test_contrastive_perturbation_maps_against_the_prediction_are_not_zero(method):
    """Contrastive's forward returned -log_softmax, whose entry for the predicted class of a
    confident float32 model rounds to 0 (a gap of 27: true value 3e-12): every difference a
    perturbation method takes was 0 and the map was all zeros, silently."""
    import captum.attr

    from captum_ext.attr import Contrastive

    model = _confident(2.0)
    x = load_sample_digits()[0][35:36]
    logits = model(x).detach()
    top2 = logits.topk(2).values[0]
    assert float(top2[0] - top2[1]) > 20  # confident: float32's -log p_P would round to 0
    predicted = logits.argmax(1)
    cls = getattr(captum.attr, method)
    kwargs = {"sliding_window_shapes": (1, 4, 4), "strides": (1, 4, 4)}
    if method == "FeatureAblation":
        kwargs = {"feature_mask": (torch.arange(49).view(7, 7).repeat_interleave(4, 0))
                  .repeat_interleave(4, 1)[None, None]}  # fmt: skip
    got = Contrastive(cls, model).attribute(x, contrast=predicted, **kwargs)
    model64 = copy.deepcopy(model).double()

    def cross_entropy64(t):
        z = model64(t)  # float64: -log p_P by log1p of the other classes' mass
        top = z.argmax(1, keepdim=True)
        shifted = z - z.gather(1, top)
        return -(shifted - torch.log1p(torch.exp(shifted).scatter(1, top, 0).sum(1, True)))

    expected = cls(cross_entropy64).attribute(x.double(), target=predicted, **kwargs).double()
    assert expected.abs().max() > 0
    torch.testing.assert_close(got.double(), expected, rtol=1e-3, atol=1e-3 * expected.abs().max())


def test_mc_dropout_keeps_the_top_class_term_on_confident_predictions():
    """mc_dropout's top-class term (1 - p) log(1 - p)... rounded away when the mean top
    probability rounds to 1 (relative error 3-6 % against float64 at gaps of 4-56)."""
    from captum_ext.metrics.trust_baselines import mc_dropout

    model = _confident(3.0)
    x = load_sample_digits()[0][:24]
    seen = []
    handle = model.classifier.register_forward_hook(lambda m, i, o: seen.append(o.double()))
    try:
        scores = mc_dropout(model, x, n_passes=8, generator=0).double()
    finally:
        handle.remove()
    z = torch.stack(seen).detach()  # the passes' logits, (T, N, C)
    p = z.softmax(2)
    mean = p.mean(0)
    top = mean.argmax(1, keepdim=True)
    rest = p.scatter(2, top.expand(len(z), -1, -1), 0).sum(2).mean(0)  # 1 - p_bar_P, exact
    expected = torch.log1p(-rest) * (1 - rest) + torch.special.xlogy(mean, mean).scatter(
        1, top, 0
    ).sum(1)
    assert (expected > -1e-6).any()  # some predictions are confident enough to matter
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=0)


def test_zero_maps_of_a_half_precision_model_name_underflow_first():
    """A float16 model's gradients for a confident prediction's cross-entropy underflow to
    zero; the warning blamed vision transformers, checkpointing and no_grad only."""
    import warnings

    from captum_ext.attr import ContrastCAM

    model = _confident(3.0).half()
    x = load_sample_digits()[0][[0, 10, 18, 27, 35]].half()
    predicted = model(x).argmax(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        maps = ContrastCAM(model, "features.7").attribute(x, contrast=predicted)
    assert not bool(maps.any())
    messages = [str(w.message) for w in caught if "exactly zero" in str(w.message)]
    assert len(messages) == 1, [str(w.message) for w in caught]
    assert "runs in float16" in messages[0] and "copy.deepcopy(model).float()" in messages[0]
    assert messages[0].index("float16") < messages[0].index("vision transformer")
