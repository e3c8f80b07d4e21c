"""Contrastive: any Captum gradient method explaining CE(f(x), Q)."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from _helpers import assert_model_unchanged, guided_copy, model_snapshot
from captum.attr import (
    GuidedBackprop,
    InputXGradient,
    IntegratedGradients,
    LayerGradCam,
    NoiseTunnel,
    Saliency,
)
from torch import nn

from captum_ext.attr import ContrastCAM, Contrastive, LayerGradCamPlusPlus


def cross_entropy_gradient(model, x, contrast):
    x = x.clone().requires_grad_(True)
    loss = nn.functional.cross_entropy(model(x), contrast, reduction="sum")
    return torch.autograd.grad(loss, x)[0]


def test_saliency_is_the_gradient_of_the_cross_entropy(tiny_cnn, tiny_inputs):
    contrast = torch.tensor([3, 1, 0, 4])
    got = Contrastive(Saliency, tiny_cnn).attribute(tiny_inputs, contrast=contrast, abs=False)
    torch.testing.assert_close(got, cross_entropy_gradient(tiny_cnn, tiny_inputs, contrast))
    x_times_grad = Contrastive(InputXGradient, tiny_cnn).attribute(tiny_inputs, contrast)
    torch.testing.assert_close(x_times_grad, tiny_inputs * got)


def test_integrated_gradients_complete_to_the_cross_entropy_difference(tiny_cnn, tiny_inputs):
    contrast = torch.tensor([0, 2, 2, 1])
    baselines = torch.zeros_like(tiny_inputs)
    attr, delta = Contrastive(IntegratedGradients, tiny_cnn).attribute(
        tiny_inputs, contrast, baselines=baselines, n_steps=300, return_convergence_delta=True
    )
    ce = nn.functional.cross_entropy
    expected = ce(tiny_cnn(tiny_inputs), contrast, reduction="none") - ce(
        tiny_cnn(baselines), contrast, reduction="none"
    )
    torch.testing.assert_close(attr.sum(dim=(1, 2, 3)), expected.detach(), atol=1e-3, rtol=0)
    assert delta.abs().max() < 1e-3


def test_guided_backprop_matches_a_hand_written_guided_relu(tiny_cnn, tiny_inputs):
    guided = guided_copy(tiny_cnn)
    contrast = torch.tensor([4, 4, 1, 0])
    expected = cross_entropy_gradient(guided, tiny_inputs, contrast)
    got = Contrastive(GuidedBackprop, tiny_cnn).attribute(tiny_inputs, contrast)
    torch.testing.assert_close(got, expected)


def test_layer_methods_equal_contrast_cam(tiny_cnn, tiny_inputs):
    contrast = [1, 0, 3, 2]
    via_wrapper = Contrastive(LayerGradCam, tiny_cnn, tiny_cnn.features[3]).attribute(
        tiny_inputs, contrast, relu_attributions=True
    )
    direct = ContrastCAM(tiny_cnn, "features.3").attribute(tiny_inputs, contrast)
    torch.testing.assert_close(via_wrapper.detach(), direct)
    plus_plus = Contrastive(LayerGradCamPlusPlus(tiny_cnn, "features.3")).attribute(
        tiny_inputs, contrast
    )
    torch.testing.assert_close(
        plus_plus,
        ContrastCAM(tiny_cnn, "features.3", weighting="gradcam++").attribute(tiny_inputs, contrast),
    )


def test_default_contrast_is_runner_up(tiny_cnn, tiny_inputs):
    runner_up = tiny_cnn(tiny_inputs).topk(2).indices[:, 1]
    saliency = Contrastive(Saliency, tiny_cnn)
    torch.testing.assert_close(
        saliency.attribute(tiny_inputs), saliency.attribute(tiny_inputs, runner_up)
    )


@pytest.mark.parametrize("batch_size", [None, 3, 1])
def test_all_contrasts_equal_stacked_single_calls(tiny_cnn, tiny_inputs, batch_size):
    ig = Contrastive(IntegratedGradients, tiny_cnn)
    baselines = torch.randn_like(tiny_inputs)
    every = ig.attribute(tiny_inputs, "all", baselines=baselines, n_steps=8, batch_size=batch_size)
    assert every.shape == (4, 5, 3, 6, 6)
    for q in range(5):
        single = ig.attribute(tiny_inputs, q, baselines=baselines, n_steps=8)
        torch.testing.assert_close(every[:, q], single)
    pair = ig.attribute(tiny_inputs, [[2, 0]], baselines=baselines, n_steps=8)
    torch.testing.assert_close(pair, every[:, [2, 0]])


def test_all_contrasts_with_tuple_inputs_and_additional_args():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.b = nn.Linear(2, 4)

        def forward(self, x, y, scale):
            return self.a(x) * scale + self.b(y).tanh()

    torch.manual_seed(0)
    model = TwoInputs().double()
    x, y = torch.randn(3, 3, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    scale = torch.tensor([[1.0], [2.0], [0.5]], dtype=torch.float64)
    saliency = Contrastive(Saliency, model)
    every = saliency.attribute((x, y), "all", additional_forward_args=(scale,), abs=False)
    assert isinstance(every, tuple) and every[0].shape == (3, 4, 3) and every[1].shape == (3, 4, 2)
    for q in range(4):
        single = saliency.attribute((x, y), q, additional_forward_args=(scale,), abs=False)
        torch.testing.assert_close(every[0][:, q], single[0])
        torch.testing.assert_close(every[1][:, q], single[1])


def test_noise_tunnel_inside_with_zero_noise_equals_plain(tiny_cnn, tiny_inputs):
    plain = Contrastive(Saliency, tiny_cnn).attribute(tiny_inputs, [0, 1, 2, 3])
    smooth = Contrastive(NoiseTunnel(Saliency(tiny_cnn))).attribute(
        tiny_inputs, [0, 1, 2, 3], nt_type="smoothgrad", nt_samples=3, stdevs=0.0
    )
    torch.testing.assert_close(smooth, plain)


def test_wrapping_copies_and_leaves_everything_as_it_was(tiny_cnn, tiny_inputs):
    saliency = Saliency(tiny_cnn)
    tunnel = NoiseTunnel(saliency)
    before = model_snapshot(tiny_cnn)
    wrapped = Contrastive(tunnel)
    wrapped.attribute(tiny_inputs, "all", nt_samples=2)
    assert tunnel.forward_func is tiny_cnn and saliency.forward_func is tiny_cnn
    assert tunnel.attribution_method is saliency
    assert_model_unchanged(tiny_cnn, before)
    x = tiny_inputs.clone()
    wrapped.attribute(x, 0, nt_samples=2)
    assert not x.requires_grad


def test_properties_are_forwarded(tiny_cnn):
    assert Contrastive(InputXGradient, tiny_cnn).multiplies_by_inputs is True
    assert Contrastive(Saliency, tiny_cnn).multiplies_by_inputs is False
    assert Contrastive(IntegratedGradients, tiny_cnn).has_convergence_delta() is True
    assert Contrastive(Saliency, tiny_cnn).forward_func is tiny_cnn


class TestBadInput:
    def test_target_is_refused(self, tiny_cnn, tiny_inputs):
        with pytest.raises(TypeError, match="contrast.*not `target`"):
            Contrastive(Saliency, tiny_cnn).attribute(tiny_inputs, target=1)

    def test_not_an_attribution(self, tiny_cnn):
        with pytest.raises(TypeError, match="method"):
            Contrastive(nn.Linear, tiny_cnn)
        with pytest.raises(TypeError, match="forward_func"):
            Contrastive(Saliency)
        with pytest.raises(TypeError, match="already an instance"):
            Contrastive(Saliency(tiny_cnn), tiny_cnn)
        with pytest.raises(TypeError, match="already Contrastive"):
            Contrastive(Contrastive(Saliency, tiny_cnn))

    def test_contrast_out_of_range_and_length(self, tiny_cnn, tiny_inputs):
        saliency = Contrastive(Saliency, tiny_cnn)
        with pytest.raises(ValueError, match="contrast"):
            saliency.attribute(tiny_inputs, 5)
        with pytest.raises(ValueError, match="contrast"):
            saliency.attribute(tiny_inputs, [0, 1, 2])
        with pytest.raises(ValueError, match="batch_size"):
            saliency.attribute(tiny_inputs, "all", batch_size=0)

    def test_non_2d_output(self, tiny_inputs):
        model = nn.Conv2d(3, 2, 3).double()
        with pytest.raises(ValueError, match="output_transform"):
            Contrastive(Saliency, model).attribute(tiny_inputs, 0)


class CountForwards:
    """Counts the model's forward calls with a forward hook (removed on exit)."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __enter__(self):
        self.handle = self.model.register_forward_hook(self._count)
        return self

    def _count(self, module, args, output):
        self.calls += 1

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize("contrast", [2, [3, 1, 0, 4], torch.tensor([3, 1, 0, 4])])
def test_one_forward_when_the_contrast_is_given(tiny_cnn, tiny_inputs, contrast):
    """Saliency runs the model once itself; before the fix, Contrastive ran it once more to
    find the classes (2 forwards), now only when it must (runner-up, 'all')."""
    saliency = Contrastive(Saliency, tiny_cnn)
    with CountForwards(tiny_cnn) as counter:
        saliency.attribute(tiny_inputs, contrast)
    assert counter.calls == 1
    with CountForwards(tiny_cnn) as counter:
        saliency.attribute(tiny_inputs)  # the runner-up needs the logits first
    assert counter.calls == 2


def test_an_explicit_contrast_out_of_range_is_still_refused(tiny_cnn, tiny_inputs):
    before = model_snapshot(tiny_cnn)
    for method in (Contrastive(Saliency, tiny_cnn), Contrastive(IntegratedGradients, tiny_cnn)):
        with pytest.raises(ValueError, match=r"`contrast` holds class indices outside \[-5, 5\)"):
            method.attribute(tiny_inputs, [0, 1, 2, 7])
        with pytest.raises(ValueError, match="contrast"):
            method.attribute(tiny_inputs, [[0, 9]])
    assert_model_unchanged(tiny_cnn, before)
    assert Contrastive(Saliency, tiny_cnn).contrastive_forward._max_class is None


@pytest.mark.parametrize(
    "make, kwargs",
    [
        (lambda m: Contrastive(Saliency, m), {}),
        (lambda m: Contrastive(IntegratedGradients, m), {"n_steps": 4}),
        (lambda m: Contrastive(NoiseTunnel(Saliency(m))), {"nt_samples": 2}),
        (lambda m: Contrastive(LayerGradCam, m, m.features[3]), {}),
    ],
)
@pytest.mark.parametrize("contrast", [None, 1, "all"])
def test_train_mode_batchnorm_statistics_come_back_unchanged(
    tiny_cnn, tiny_inputs, make, kwargs, contrast
):
    model = tiny_cnn.train()
    before = model_snapshot(model)
    make(model).attribute(tiny_inputs, contrast, **kwargs)
    assert_model_unchanged(model, before)
    assert all(m.training for m in model.modules())


def test_confident_model_saliency_is_finite_and_equals_float64(confident_model, sample_digits):
    images = sample_digits[0][:8]
    got = Contrastive(Saliency, confident_model).attribute(images, abs=False)
    assert torch.isfinite(got).all()
    reference = copy.deepcopy(confident_model).double()
    logits = reference(images.double())
    runner_up = logits.topk(2).indices[:, 1]
    expected = cross_entropy_gradient(reference, images.double(), runner_up)
    scale = expected.abs().amax(dim=(1, 2, 3), keepdim=True)
    assert ((got.double() - expected).abs() <= 1e-4 * scale).all()


def test_negative_contrast_counts_from_the_last_class(tiny_cnn, tiny_inputs):
    saliency = Contrastive(Saliency, tiny_cnn)
    negative = saliency.attribute(tiny_inputs, [-1, -5, 0, 2])
    torch.testing.assert_close(negative, saliency.attribute(tiny_inputs, [4, 0, 0, 2]))
    with pytest.raises(ValueError, match="contrast"):
        saliency.attribute(tiny_inputs, -6)


def test_max_batch_is_the_deprecated_name_of_batch_size(tiny_cnn, tiny_inputs):
    saliency = Contrastive(Saliency, tiny_cnn)
    expected = saliency.attribute(tiny_inputs, "all", batch_size=2)
    with pytest.warns(DeprecationWarning, match="`max_batch` is renamed `batch_size`"):
        old = saliency.attribute(tiny_inputs, "all", max_batch=2)
    torch.testing.assert_close(old, expected)
    with pytest.raises(TypeError, match="both"):
        saliency.attribute(tiny_inputs, "all", max_batch=2, batch_size=2)
    assert "batch_size" in inspect.signature(Contrastive.attribute).parameters


@pytest.mark.parametrize("batch", [1, 4, 5])
def test_batch_sizes_with_per_example_contrasts(batch):
    from _helpers import make_tiny_cnn

    model = make_tiny_cnn().eval()
    x = torch.randn(
        batch, 3, 6, 6, generator=torch.Generator().manual_seed(batch), dtype=torch.float64
    )
    contrasts = [(2 * i + 1) % 5 for i in range(batch)]
    saliency = Contrastive(Saliency, model)
    result = saliency.attribute(x, contrasts)
    assert result.shape == x.shape
    for i in range(batch):
        single = saliency.attribute(x[i : i + 1], contrasts[i])
        torch.testing.assert_close(result[i : i + 1], single)


def test_the_confident_class_own_contrast_equals_float64(bundled_model, sample_digits):
    """Contrastive(Saliency) with Q == P on the most confident sample digits: torch's
    log-softmax backward forms p_P - 1, which is 0 in float32 once p_P rounds to 1 (logit
    gap 18.5 here), and the gradient of CE(z, P) lost its largest term (relative error 0.8).
    The contrastive forward's backward now uses the exact complement 1 - p_P."""
    x, _ = sample_digits
    logits = bundled_model(x).detach()
    top = logits.topk(2, dim=1).values
    confident = (top[:, 0] - top[:, 1]).argsort(descending=True)[:4]
    x, own = x[confident], logits[confident].argmax(1)
    model64 = copy.deepcopy(bundled_model).double()
    x64 = x.double().requires_grad_(True)
    picked = -torch.log_softmax(model64(x64), dim=1).gather(1, own[:, None])
    (expected,) = torch.autograd.grad(picked.sum(), x64)
    got = Contrastive(Saliency(bundled_model)).attribute(x, contrast=own, abs=False)
    scale = expected.flatten(1).abs().amax(1)
    error = (got.double() - expected).flatten(1).abs().amax(1) / scale
    assert float(error.max()) < 1e-4, error
    # and the runner-up contrast, as before
    runner_up = logits[confident].topk(2, dim=1).indices[:, 1]
    got = Contrastive(Saliency(bundled_model)).attribute(x, contrast=runner_up, abs=False)
    picked = -torch.log_softmax(model64(x64), dim=1).gather(1, runner_up[:, None])
    (expected,) = torch.autograd.grad(picked.sum(), x64)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-6)
