"""VOICE against an explicit per-class loop (the published procedure) in float64."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from _helpers import assert_model_unchanged, guided_copy, make_tiny_cnn, model_snapshot
from captum.attr import GuidedBackprop, LayerGradCam, NoiseTunnel, Saliency
from torch import nn

from captum_ext.attr import VOICE, ContrastCAM, CounterfactualCAM, GradCAM, LayerGradCamPlusPlus


def _minmax(m):
    low, high = m.min(), m.max()
    return (m - low) / (high - low) if high > low else torch.zeros_like(m)


def _cam_by_hand(model, x, scalar_of_logits, plus_plus):
    """One example, one class: forward hook, autograd, Grad-CAM(++) weights, ReLU."""
    store = {}
    handle = model.features[3].register_forward_hook(lambda m, a, o: store.update(a=o))
    logits = model(x)
    handle.remove()
    activations = store["a"]
    (g,) = torch.autograd.grad(scalar_of_logits(logits[0]), activations)
    activations, g = activations[0].detach(), g[0]
    if plus_plus:
        total = activations.sum(dim=(1, 2), keepdim=True)
        denominator = 2 * g**2 + total * g**3
        alpha = torch.where(g != 0, g**2 / torch.where(g != 0, denominator, 1), 0)
        weights = (alpha * g.clamp(min=0)).sum(dim=(1, 2))
    else:
        weights = g.mean(dim=(1, 2))
    return torch.relu((weights[:, None, None] * activations).sum(0))


def _guided_gradient(model, x, scalar_of_logits):
    guided = guided_copy(model)
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(scalar_of_logits(guided(x)[0]), x)
    return g[0]


def reference_voice(model, x, kind):
    """The published procedure: one image at a time, one backward per contrast class."""
    outputs = []
    for i in range(x.shape[0]):
        xi = x[i : i + 1]
        logits = model(xi)[0].detach()
        p = int(logits.argmax())
        maps = []

        def one_map(scalar, xi=xi):
            if kind == "guided":
                return torch.relu(_guided_gradient(model, xi, scalar))
            cam = _cam_by_hand(model, xi, scalar, plus_plus=kind == "gradcam++")
            up = F.interpolate(cam[None, None], size=x.shape[2:], mode="bilinear")
            return up[0]

        for q in range(logits.shape[0]):
            if q == p:
                continue
            maps.append(_minmax(one_map(lambda z, q=q: -torch.log_softmax(z, 0)[q])))
        variance = torch.stack(maps).var(dim=0, unbiased=False)
        explanation = _minmax(one_map(lambda z, p=p: z[p]))
        outputs.append((_minmax(variance), explanation, p))
    return outputs


@pytest.mark.parametrize(
    "kind, make",
    [
        ("gradcam", lambda m: GradCAM(m, "features.3")),
        ("gradcam", lambda m: LayerGradCam(m, m.features[3])),
        ("gradcam++", lambda m: LayerGradCamPlusPlus(m, "features.3")),
        ("guided", lambda m: GuidedBackprop(m)),
    ],
)
def test_uncertainty_equals_the_per_class_loop(kind, make):
    model = make_tiny_cnn(num_classes=7)
    x = torch.randn(3, 3, 9, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    before = model_snapshot(model)
    result = VOICE(make(model)).attribute(x, max_batch=3)
    assert_model_unchanged(model, before)
    expected = reference_voice(model, x, kind)
    for i, (uncertainty, explanation, p) in enumerate(expected):
        assert int(result.prediction[i]) == p
        torch.testing.assert_close(
            result.uncertainty[i],
            uncertainty,
            atol=1e-6,
            rtol=0,
        )
        torch.testing.assert_close(
            result.explanation[i],
            explanation,
            atol=1e-6,
            rtol=0,
        )
    assert torch.equal(result.n_contrasts, torch.full((3,), 6))


def _signal_or_volume_model(spatial: int) -> nn.Module:
    conv = {1: nn.Conv1d, 3: nn.Conv3d}[spatial]
    pool = {1: nn.AdaptiveAvgPool1d, 3: nn.AdaptiveAvgPool3d}[spatial]
    torch.manual_seed(spatial)
    return nn.Sequential(
        conv(2, 6, 3, padding=1), nn.ReLU(), conv(6, 6, 3, padding=1, stride=2), nn.ReLU(),
        pool(1), nn.Flatten(), nn.Linear(6, 5),
    ).double().eval()  # fmt: skip


@pytest.mark.parametrize("shape", [(3, 2, 16), (3, 2, 4, 6, 6)], ids=["signal", "volume"])
def test_signals_and_volumes_get_the_per_class_loop_with_a_channel_dim(shape):
    """A 1-D (N, C, L) or 3-D (N, C, T, H, W) model: VOICE's uncertainty is the per-class
    loop of Captum's LayerGradCam on the cross-entropies, each map ReLU-ed, upsampled
    (linear / trilinear), min-max normalised, their population variance min-max normalised;
    returned as (N, 1, *spatial) like the 2-D maps. Before, a signal's VOICE raised on its
    own read-out ("expected (N, 1, H, W)") and a volume's maps lost their channel dim."""
    from captum.attr import LayerAttribution

    model = _signal_or_volume_model(len(shape) - 2)
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    result = VOICE(GradCAM(model, "3")).attribute(x)
    n, spatial = shape[0], shape[2:]
    assert result.uncertainty.shape == result.explanation.shape == (n, 1, *spatial)
    logits = model(x).detach()
    mode = "linear" if len(spatial) == 1 else "trilinear"

    def post(cam):
        up = LayerAttribution.interpolate(torch.relu(cam), spatial, interpolate_mode=mode)
        return _minmax_per_example(up)

    cross_entropy = LayerGradCam(lambda inputs: -torch.log_softmax(model(inputs), 1), model[3])
    for i in range(n):
        p = int(logits[i].argmax())
        maps = [post(cross_entropy.attribute(x[i : i + 1], target=q)) for q in range(5) if q != p]
        expected = _minmax_per_example(torch.cat(maps).var(dim=0, unbiased=False)[None])
        torch.testing.assert_close(result.uncertainty[i : i + 1], expected, atol=1e-6, rtol=0)
    from captum_ext.metrics import voice_iou, voice_snr

    torch.testing.assert_close(result.iou, voice_iou(result.explanation, result.uncertainty))
    torch.testing.assert_close(result.snr, voice_snr(result.uncertainty))


def _minmax_per_example(maps):
    flat = maps.flatten(1)
    low, high = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - low) / (high - low).clamp_min(1e-12)).view_as(maps)


def test_batch_equals_one_by_one_and_chunking_does_not_matter():
    model = make_tiny_cnn(num_classes=6)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    voice = VOICE(GradCAM(model, "features.3"))
    batch = voice.attribute(x)
    for max_batch in (1, 4):
        chunked = voice.attribute(x, max_batch=max_batch)
        torch.testing.assert_close(chunked.uncertainty, batch.uncertainty)
    for i in range(4):
        alone = voice.attribute(x[i : i + 1])
        for field in ("explanation", "contrast", "uncertainty", "iou", "snr", "log_likelihood"):
            torch.testing.assert_close(getattr(alone, field)[0], getattr(batch, field)[i])


def test_contrast_is_the_runner_up_contrast_cam():
    model = make_tiny_cnn(num_classes=6)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    result = VOICE(GradCAM(model, "features.3")).attribute(x, contrasts=2)
    expected = ContrastCAM(model, "features.3").attribute(
        x, upsample_to_input=True, normalize="minmax"
    )
    torch.testing.assert_close(result.contrast, expected)
    assert torch.equal(result.contrast_class, model(x).topk(2).indices[:, 1])
    log_p = torch.log_softmax(model(x), 1).max(1).values.detach()
    torch.testing.assert_close(result.log_likelihood, log_p)


def test_top_k_and_explicit_contrasts():
    model = make_tiny_cnn(num_classes=6)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    voice = VOICE(GradCAM(model, "features.3"))
    order = model(x).argsort(1, descending=True)
    top3 = voice.attribute(x, contrasts=3)
    explicit = voice.attribute(x, contrasts=order[:, 1:4])
    torch.testing.assert_close(top3.uncertainty, explicit.uncertainty)
    assert torch.equal(top3.n_contrasts, torch.full((3,), 3))
    everything = voice.attribute(x, contrasts="all")
    listed = voice.attribute(x, contrasts=list(range(6)))
    torch.testing.assert_close(everything.uncertainty, listed.uncertainty)


def test_a_contrast_class_named_twice_is_refused():
    """A repeated class was weighted twice in the variance and counted twice in
    `n_contrasts` ([2, 2, 3, 4]: 4 contrasts, maps up to 0.159 apart from [2, 3, 4])."""
    model = make_tiny_cnn(num_classes=6)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    voice = VOICE(GradCAM(model, "features.3"))
    for contrasts in ([2, 2, 3, 4], torch.tensor([[1, 2, 3], [4, 5, 4]])):
        with pytest.raises(ValueError, match="`contrasts` names a class other than P more"):
            voice.attribute(x, contrasts=contrasts)
    assert torch.equal(voice.attribute(x, contrasts=[2, 3, 4]).n_contrasts.max(), torch.tensor(3))
    # P itself may pad a row (it is left out): per-example sets of different sizes
    p = model(x).argmax(1)
    padded = torch.stack([torch.tensor([q for q in range(6) if q != int(c)][:3] + [int(c)] * 2)
                          for c in p])  # fmt: skip
    padded[1, 2] = p[1]  # the second example: two contrasts, P three times
    result = voice.attribute(x, contrasts=padded)
    assert result.n_contrasts.tolist() == [3, 2]
    alone = voice.attribute(x[1:], contrasts=padded[1:2, :2])
    torch.testing.assert_close(result.uncertainty[1:], alone.uncertainty)


def test_two_classes_give_zero_uncertainty_not_nan():
    model = make_tiny_cnn(num_classes=2)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    with pytest.warns(UserWarning, match="a two-class model has one"):
        result = VOICE(GradCAM(model, "features.3")).attribute(x)
    assert torch.equal(result.uncertainty, torch.zeros_like(result.uncertainty))
    assert torch.isfinite(result.iou).all() and torch.isfinite(result.snr).all()
    assert torch.equal(result.snr, torch.zeros(3, dtype=result.snr.dtype))


def test_constant_maps_give_zeros_not_nan():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 5),
    ).eval()
    result = VOICE(GradCAM(model, "0")).attribute(torch.zeros(2, 1, 6, 6))
    for field in ("explanation", "contrast", "uncertainty"):
        assert torch.equal(getattr(result, field), torch.zeros_like(getattr(result, field)))
    assert torch.isfinite(result.iou).all() and torch.isfinite(result.snr).all()


def test_smoothgrad_with_zero_noise_equals_saliency_and_is_reproducible():
    model = make_tiny_cnn(num_classes=5)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    plain = VOICE(Saliency(model)).attribute(x)
    smooth = VOICE(NoiseTunnel(Saliency(model))).attribute(x, nt_samples=3, stdevs=0.0)
    torch.testing.assert_close(smooth.uncertainty, plain.uncertainty)
    noisy = [
        VOICE(NoiseTunnel(Saliency(model))).attribute(
            x, nt_samples=4, stdevs=0.2, generator=torch.Generator().manual_seed(1)
        )
        for _ in range(2)
    ]
    torch.testing.assert_close(noisy[0].uncertainty, noisy[1].uncertainty)
    assert not torch.allclose(noisy[0].uncertainty, plain.uncertainty)


def test_bad_arguments():
    model = make_tiny_cnn(num_classes=5)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with pytest.raises(TypeError, match="method"):
        VOICE(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="CounterfactualCAM"):
        VOICE(CounterfactualCAM(model, "features.3"))
    with pytest.raises(ValueError, match="postprocess"):
        VOICE(GradCAM(model, "features.3"), postprocess="fancy")
    voice = VOICE(GradCAM(model, "features.3"))
    for bad in (0, 1, 5, "most"):
        with pytest.raises(ValueError, match="contrasts"):
            voice.attribute(x, contrasts=bad)
    with pytest.raises(ValueError, match="contrasts"):
        voice.attribute(x, contrasts=[0, 9])
    with pytest.raises(ValueError, match="nt_samples"):
        VOICE(NoiseTunnel(Saliency(model))).attribute(x, nt_samples=0)


def test_target_chooses_the_explained_class():
    model = make_tiny_cnn(num_classes=6)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    voice = VOICE(GradCAM(model, "features.3"))
    logits = model(x).detach()
    predicted = logits.argmax(1)
    default = voice.attribute(x)
    same = voice.attribute(x, target=predicted)
    torch.testing.assert_close(same.uncertainty, default.uncertainty)
    other = (predicted + 1) % 6
    result = voice.attribute(x, target=other)
    assert torch.equal(result.target, other) and torch.equal(result.prediction, predicted)
    explanation = GradCAM(model, "features.3").attribute(
        x, other, upsample_to_input=True, normalize="minmax"
    )
    torch.testing.assert_close(result.explanation, explanation)
    masked = logits.clone()
    masked[torch.arange(4), other] = -float("inf")
    assert torch.equal(result.contrast_class, masked.argmax(1))
    explicit = voice.attribute(x, target=other, contrasts=list(range(6)))
    torch.testing.assert_close(result.uncertainty, explicit.uncertainty)
    torch.testing.assert_close(
        result.log_likelihood, torch.log_softmax(logits, 1)[torch.arange(4), other]
    )
    with pytest.raises(ValueError, match="target"):
        voice.attribute(x, target=6)


@pytest.mark.parametrize("batch", [1, 4, 5])
def test_batch_sizes_with_per_example_targets(batch):
    model = make_tiny_cnn().eval()
    x = torch.randn(
        batch, 3, 6, 6, generator=torch.Generator().manual_seed(batch), dtype=torch.float64
    )
    targets = [(3 * i + 2) % 5 for i in range(batch)]
    voice = VOICE(GradCAM(model, "features.3"))
    result = voice.attribute(x, target=targets, contrasts=[[0, 1]] * batch)
    assert result.explanation.shape[0] == batch
    assert result.uncertainty.shape[0] == batch
    for i in range(batch):
        with warnings.catch_warnings():  # a target of 0 or 1 leaves one contrast class
            warnings.filterwarnings("ignore", message="VOICE: every example has fewer")
            single = voice.attribute(x[i : i + 1], target=targets[i], contrasts=[[0, 1]])
        torch.testing.assert_close(result.explanation[i : i + 1], single.explanation)
        torch.testing.assert_close(result.uncertainty[i : i + 1], single.uncertainty)


# ------------------------------------------------------------------ read-outs tied to the maps


@pytest.mark.parametrize("threshold", [0.1, 0.35])
@pytest.mark.parametrize(
    "make, postprocess",
    [
        (lambda m: GradCAM(m, "features.7"), "reference"),
        (lambda m: GradCAM(m, "features.7"), "raw"),
        (lambda m: Saliency(m), "reference"),
        (lambda m: GuidedBackprop(m), "reference"),
    ],
)
def test_iou_and_snr_are_the_readouts_of_the_returned_maps(
    bundled_model, bundled_digits, make, postprocess, threshold
):
    """``VOICEResult.iou`` / ``.snr`` are :func:`voice_iou` of the returned explanation and
    uncertainty and :func:`voice_snr` of the returned uncertainty (channel means), on the
    confident bundled model; the IoU of the contrast map instead of the explanation is a
    different number on these digits, so a read-out computed from the wrong map fails."""
    from captum_ext.metrics import voice_iou, voice_snr

    images = bundled_digits[0][:8]
    result = VOICE(make(bundled_model), postprocess=postprocess).attribute(
        images, threshold=threshold
    )
    explanation, uncertainty = result.explanation.mean(1), result.uncertainty.mean(1)
    torch.testing.assert_close(result.iou, voice_iou(explanation, uncertainty, threshold=threshold))
    torch.testing.assert_close(result.snr, voice_snr(uncertainty))
    from_contrast = voice_iou(result.contrast.mean(1), uncertainty, threshold=threshold)
    assert not torch.allclose(result.iou, from_contrast)
    other = 0.6 if threshold < 0.5 else 0.05
    assert not torch.allclose(result.iou, voice_iou(explanation, uncertainty, threshold=other))


# ------------------------------------------------------------------ Finer-CAM as the explanation


def test_finer_cam_explanation_with_grad_cam_contrasts():
    """VOICE(FinerCAM): the explanation is Finer-CAM's map of P (ReLU, bilinear upsampling,
    min-max, as the reference post-processing does for every CAM) and the uncertainty is
    Grad-CAM's, since the contrasts are Grad-CAM's "Why P, rather than Q?"."""
    from captum_ext.attr import FinerCAM

    model = make_tiny_cnn(num_classes=7)
    x = torch.randn(3, 3, 9, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    before = model_snapshot(model)
    finer = FinerCAM(model, "features.3", alpha=0.8)
    result = VOICE(finer).attribute(x, max_batch=4)
    assert_model_unchanged(model, before)
    grad_cam = VOICE(GradCAM(model, "features.3")).attribute(x)
    torch.testing.assert_close(result.uncertainty, grad_cam.uncertainty)
    torch.testing.assert_close(result.contrast, grad_cam.contrast)
    predicted = model(x).argmax(1)
    low = finer.attribute(x, target=predicted)
    expected = F.interpolate(low, size=x.shape[2:], mode="bilinear")
    for i in range(3):
        torch.testing.assert_close(result.explanation[i], _minmax(expected[i]), atol=1e-6, rtol=0)
    assert not torch.allclose(result.explanation, grad_cam.explanation)


@pytest.mark.parametrize("name", ["LayerIBA", "PathwayGradient"])
def test_methods_without_a_one_pass_contrastive_form_are_refused(name):
    import captum_ext.attr as attr

    model = make_tiny_cnn(num_classes=4)
    method = (
        attr.LayerIBA(model, "features.3") if name == "LayerIBA" else attr.PathwayGradient(model)
    )
    with pytest.raises(TypeError, match=f"`method` must be .*got {name}"):
        VOICE(method)


def test_a_target_against_the_confident_class_equals_float64(bundled_model, sample_digits):
    """Explaining a class other than the prediction makes the confident class one of the
    contrasts; its cross-entropy gradient p - e_Q has the entry p_Q - 1, which is 0 in
    float32 once p_Q rounds to 1, and the uncertainty map was off by up to 46 % of its
    maximum on the most confident digits. Now within float32 rounding of float64."""
    import copy

    x, _ = sample_digits
    logits = bundled_model(x).detach()
    top = logits.topk(2, dim=1).values
    confident = (top[:, 0] - top[:, 1]).argsort(descending=True)[:4]
    x, target = x[confident], (logits[confident].argmax(1) + 1) % 10
    model64 = copy.deepcopy(bundled_model).double()
    got = VOICE(GradCAM(bundled_model, "features.7")).attribute(x, target=target)
    expected = VOICE(GradCAM(model64, "features.7")).attribute(x.double(), target=target)
    for name in ("explanation", "uncertainty"):
        a, b = getattr(got, name).double(), getattr(expected, name)
        error = (a - b).flatten(1).abs().amax(1) / b.flatten(1).abs().amax(1)
        assert float(error.max()) < 1e-4, (name, error)


def test_voice_given_a_model_and_a_layer_says_it_wraps_a_method(bundled_model):
    """VOICE(model, "features.7"), as the CAMs are called, said "`postprocess`='features.7':
    expected one of ('reference', 'raw')"."""
    with pytest.raises(TypeError, match=r"VOICE\(GradCAM\(model, 'features.7'\)\)"):
        VOICE(bundled_model, "features.7")


def test_smoothgrad_noise_belongs_to_the_example_not_its_place_in_the_batch():
    """One noise draw for the stacked batch gave an example its neighbours' noise: its
    uncertainty moved by 0.3 with its position or batch size (the digits of the audit). Each
    example's copies come from the call's seed and its own values now."""
    model = make_tiny_cnn(num_classes=5)
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    voice = VOICE(NoiseTunnel(Saliency(model)))

    def run(batch):
        return voice.attribute(
            batch, nt_samples=4, stdevs=0.3, generator=torch.Generator().manual_seed(7)
        )

    together = run(x)
    order = torch.tensor([2, 0, 3, 1])
    shuffled = run(x[order])
    for field in ("uncertainty", "explanation", "iou", "snr"):
        torch.testing.assert_close(getattr(shuffled, field), getattr(together, field)[order])
    alone = run(x[2:3])
    torch.testing.assert_close(alone.uncertainty, together.uncertainty[2:3])
    # the same generator state twice gives the same maps; a generator used on gives others
    generator = torch.Generator().manual_seed(7)
    first = voice.attribute(x, nt_samples=4, stdevs=0.3, generator=generator)
    second = voice.attribute(x, nt_samples=4, stdevs=0.3, generator=generator)
    torch.testing.assert_close(first.uncertainty, together.uncertainty)
    assert not torch.allclose(second.uncertainty, first.uncertainty)


def test_noise_tunnel_around_voice_is_refused_clearly(bundled_model):
    """NoiseTunnel(VOICE(...)) failed with "'VOICE' object has no attribute
    'has_convergence_delta'"."""
    from captum.attr import NoiseTunnel

    from captum_ext.attr import VOICE, GradCAM

    with pytest.raises(TypeError, match="VOICE is not a Captum attribution method"):
        NoiseTunnel(VOICE(GradCAM(bundled_model, "features.7")))
