"""ContrastCAM, CounterfactualCAM and Grad-CAM++: identities, peers, batching, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _helpers import assert_model_unchanged, make_tiny_cnn, model_snapshot
from captum.attr import LayerGradCam
from torch import nn

from captum_ext._utils.maps import minmax_normalize
from captum_ext.attr import ContrastCAM, CounterfactualCAM, GradCAM, LayerGradCamPlusPlus

LAYER = "features.3"


def captum_gradcam(model, x, target, relu=False):
    return (
        LayerGradCam(model, model.features[3])
        .attribute(x, target=target, relu_attributions=relu)
        .detach()
    )


def test_contrast_identity_from_the_spec(tiny_cnn, tiny_inputs):
    """ContrastCAM weights = sum_c p_c GradCAM-weight_c - GradCAM-weight_Q (maps are linear)."""
    contrast = torch.tensor([1, 4, 0, 2])
    probs = torch.softmax(tiny_cnn(tiny_inputs), dim=1).detach()
    per_class = torch.stack([captum_gradcam(tiny_cnn, tiny_inputs, c) for c in range(5)], 1)
    expected = (probs[:, :, None, None, None] * per_class).sum(1) - per_class[
        torch.arange(4), contrast
    ]
    got = ContrastCAM(tiny_cnn, LAYER).attribute(
        tiny_inputs, contrast=contrast, relu_attributions=False
    )
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10)
    assert torch.equal(
        ContrastCAM(tiny_cnn, LAYER).attribute(tiny_inputs, contrast=contrast),
        torch.relu(got),
    )


def test_counterfactual_is_negated_gradcam(tiny_cnn, tiny_inputs):
    predicted = tiny_cnn(tiny_inputs).argmax(1)
    raw = captum_gradcam(tiny_cnn, tiny_inputs, predicted)
    got = CounterfactualCAM(tiny_cnn, LAYER).attribute(tiny_inputs)
    torch.testing.assert_close(got, torch.relu(-raw), atol=1e-12, rtol=0)
    signed = CounterfactualCAM(tiny_cnn, LAYER).attribute(
        tiny_inputs, target=3, relu_attributions=False
    )
    torch.testing.assert_close(signed, -captum_gradcam(tiny_cnn, tiny_inputs, 3))


def test_gradcam_equals_captum_layer_gradcam_for_every_target_form(tiny_cnn, tiny_inputs):
    every = GradCAM(tiny_cnn, LAYER).attribute(tiny_inputs, target="all")
    for c in range(5):
        torch.testing.assert_close(
            every[:, c : c + 1], torch.relu(captum_gradcam(tiny_cnn, tiny_inputs, c))
        )
    target = [4, 0, 2, 2]
    torch.testing.assert_close(
        GradCAM(tiny_cnn, LAYER).attribute(tiny_inputs, target, relu_attributions=False),
        captum_gradcam(tiny_cnn, tiny_inputs, target),
    )


def test_gradcam_plus_plus_formula_by_hand(tiny_cnn, tiny_inputs):
    target = torch.tensor([0, 1, 2, 3])
    store = {}
    handle = tiny_cnn.features[3].register_forward_hook(lambda m, a, o: store.update(a=o))
    logits = tiny_cnn(tiny_inputs)
    handle.remove()
    activations = store["a"]
    (g,) = torch.autograd.grad(logits[torch.arange(4), target].sum(), activations)
    activations = activations.detach()
    expected = torch.zeros(4, 1, 6, 6, dtype=torch.float64)
    for n in range(4):
        for k in range(activations.shape[1]):
            weight = 0.0
            total = activations[n, k].sum()
            for u in range(6):
                for v in range(6):
                    gkuv = g[n, k, u, v]
                    if gkuv == 0:
                        continue
                    alpha = gkuv**2 / (2 * gkuv**2 + total * gkuv**3)
                    weight += alpha * max(gkuv, 0)
            expected[n, 0] += weight * activations[n, k]
    expected = torch.relu(expected)
    got = LayerGradCamPlusPlus(tiny_cnn, LAYER).attribute(tiny_inputs, target=target)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-9)


class _CrossEntropyTarget:
    """pytorch-grad-cam target: the cross-entropy of one example's logits with label q."""

    def __init__(self, label: int) -> None:
        self.label = label

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return -torch.log_softmax(output, dim=-1)[self.label]


def test_contrast_cam_equals_pytorch_grad_cam_with_cross_entropy_target():
    """Independent peer: pytorch-grad-cam's GradCAM driven by a CE-with-Q target."""
    from pytorch_grad_cam import GradCAM

    model = make_tiny_cnn(dtype=torch.float32)
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(3))
    contrast = [2, 0, 4, 1]
    with GradCAM(model=model, target_layers=[model.features[3]]) as peer:
        theirs = peer(input_tensor=x, targets=[_CrossEntropyTarget(q) for q in contrast])
    # the peer min-max normalises (with a 1e-7 guard) at layer resolution = input size here
    ours = ContrastCAM(model, LAYER).attribute(
        x, contrast=contrast, upsample_to_input=True, normalize="minmax"
    )
    np.testing.assert_allclose(ours[:, 0].numpy(), theirs, atol=1e-5)


def test_gradcam_plus_plus_equals_pytorch_grad_cam():
    from pytorch_grad_cam import GradCAMPlusPlus
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = make_tiny_cnn(dtype=torch.float32)
    # The peer adds eps = 1e-6 to the Grad-CAM++ denominator 2 g^2 + sum(A) g^3; we guard
    # only exact zeros. Scale the logits so that g^2 >> 1e-6 and the eps does not matter.
    with torch.no_grad():
        model.classifier.weight.mul_(1e4)
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(4))
    target = [3, 1, 0, 2]
    with GradCAMPlusPlus(model=model, target_layers=[model.features[3]]) as peer:
        theirs = peer(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in target])
    ours = LayerGradCamPlusPlus(model, LAYER).attribute(
        x, target=target, upsample_to_input=True, normalize="minmax"
    )
    np.testing.assert_allclose(ours[:, 0].numpy(), theirs, atol=1e-5)


def test_contrastive_gradcam_plus_plus_uses_the_cross_entropy_signal():
    from pytorch_grad_cam import GradCAMPlusPlus

    model = make_tiny_cnn(dtype=torch.float32)
    with torch.no_grad():  # see above: make the peer's eps negligible
        model.classifier.weight.mul_(1e3)
    x = torch.randn(3, 3, 6, 6, generator=torch.Generator().manual_seed(5))
    contrast = [4, 4, 0]
    with GradCAMPlusPlus(model=model, target_layers=[model.features[3]]) as peer:
        theirs = peer(input_tensor=x, targets=[_CrossEntropyTarget(q) for q in contrast])
    ours = ContrastCAM(model, LAYER, weighting="gradcam++").attribute(
        x, contrast=contrast, normalize="minmax"
    )
    np.testing.assert_allclose(ours[:, 0].numpy(), theirs, atol=1e-5)


@pytest.mark.parametrize("method", [ContrastCAM, CounterfactualCAM, GradCAM, LayerGradCamPlusPlus])
def test_batch_equals_one_by_one_and_all_equals_single(method, tiny_cnn, tiny_inputs):
    explainer = method(tiny_cnn, LAYER)
    batch = explainer.attribute(tiny_inputs)
    alone = torch.cat([explainer.attribute(tiny_inputs[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(batch, alone, atol=1e-12, rtol=0)
    every = explainer.attribute(tiny_inputs, "all", max_batch=2)
    assert every.shape == (4, 5, 6, 6)
    for c in range(5):
        torch.testing.assert_close(every[:, c : c + 1], explainer.attribute(tiny_inputs, c))
    subset = explainer.attribute(tiny_inputs, [[4, 0]])
    torch.testing.assert_close(subset, every[:, [4, 0]])


def test_default_contrast_is_runner_up(tiny_cnn, tiny_inputs):
    runner_up = tiny_cnn(tiny_inputs).topk(2).indices[:, 1]
    cam = ContrastCAM(tiny_cnn, LAYER)
    torch.testing.assert_close(cam.attribute(tiny_inputs), cam.attribute(tiny_inputs, runner_up))


def test_float32_matches_float64(tiny_inputs):
    model64 = make_tiny_cnn()
    model32 = make_tiny_cnn(dtype=torch.float32)
    maps64 = ContrastCAM(model64, LAYER).attribute(tiny_inputs, contrast=[0, 1, 2, 3])
    maps32 = ContrastCAM(model32, LAYER).attribute(tiny_inputs.float(), contrast=[0, 1, 2, 3])
    assert maps32.dtype == torch.float32
    torch.testing.assert_close(maps32.double(), maps64, atol=1e-4, rtol=1e-4)


def test_postprocessing_upsample_then_minmax(tiny_cnn):
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cam = ContrastCAM(tiny_cnn, "features.3")
    raw = cam.attribute(x, contrast=[1, 2])
    both = cam.attribute(x, contrast=[1, 2], upsample_to_input=True, normalize="minmax")
    assert both.shape == (2, 1, 12, 12)
    flat = both.flatten(1)
    assert torch.allclose(flat.amin(1), torch.zeros(2, dtype=torch.float64))
    assert torch.allclose(flat.amax(1), torch.ones(2, dtype=torch.float64))
    from captum.attr import LayerAttribution

    expected = minmax_normalize(LayerAttribution.interpolate(raw, (12, 12), "bilinear"))
    torch.testing.assert_close(both, expected)


def test_constant_map_normalises_to_zeros_not_nan():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).eval()
    x = torch.zeros(2, 1, 5, 5)  # bias-free conv of zeros: constant (zero) activations
    maps = ContrastCAM(model, "0").attribute(x, contrast=[0, 1], normalize="minmax")
    assert torch.equal(maps, torch.zeros_like(maps))
    assert torch.equal(minmax_normalize(torch.full((1, 1, 3, 3), 7.0)), torch.zeros(1, 1, 3, 3))


def test_output_transform_for_dict_outputs(tiny_cnn, tiny_inputs):
    class DictModel(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return {"logits": self.inner(x)}

    wrapped = DictModel(tiny_cnn)
    with pytest.raises(ValueError, match="output_transform"):
        ContrastCAM(wrapped, "inner.features.3").attribute(tiny_inputs)
    got = ContrastCAM(
        wrapped, "inner.features.3", output_transform=lambda out: out["logits"]
    ).attribute(tiny_inputs, contrast=1)
    torch.testing.assert_close(got, ContrastCAM(tiny_cnn, LAYER).attribute(tiny_inputs, 1))


def test_model_unchanged_after_success_and_failure(tiny_inputs):
    model = make_tiny_cnn()
    model.classifier.bias.requires_grad_(False)
    before = model_snapshot(model)
    x = tiny_inputs.clone().requires_grad_(True)
    for method in (ContrastCAM, CounterfactualCAM, LayerGradCamPlusPlus):
        method(model, LAYER).attribute(x, "all")
        with pytest.raises(ValueError):
            method(model, LAYER).attribute(x, 99)
    assert_model_unchanged(model, before)
    assert x.requires_grad and x.grad is None


class TestBadInput:
    def test_wrong_input_rank(self, tiny_cnn):
        with pytest.raises(ValueError, match="inputs"):
            ContrastCAM(tiny_cnn, LAYER).attribute(torch.randn(3, 6, 6, dtype=torch.float64))

    def test_layer_not_in_model(self, tiny_cnn):
        with pytest.raises(ValueError, match=r"layer.*features\.3"):
            ContrastCAM(tiny_cnn, "features.33")

    def test_layer_never_runs(self, tiny_cnn, tiny_inputs):
        tiny_cnn.spare = nn.Conv2d(3, 3, 1).double()
        with pytest.raises(ValueError, match="did not run"):
            ContrastCAM(tiny_cnn, "spare").attribute(tiny_inputs)

    @pytest.mark.parametrize("contrast", [5, -6, [0, 1, 2, 9], "every", [[0, 7]], [-1, -6, 0, 0]])
    def test_contrast_out_of_range(self, tiny_cnn, tiny_inputs, contrast):
        with pytest.raises(ValueError, match="contrast"):
            ContrastCAM(tiny_cnn, LAYER).attribute(tiny_inputs, contrast=contrast)

    @pytest.mark.parametrize("contrast", [[0, 1, 2], torch.tensor([1, 2, 3])])
    def test_contrast_wrong_length(self, tiny_cnn, tiny_inputs, contrast):
        with pytest.raises(ValueError, match="contrast.*3 entries"):
            ContrastCAM(tiny_cnn, LAYER).attribute(tiny_inputs, contrast=contrast)

    @pytest.mark.parametrize("contrast", [1.5, torch.tensor([0.0, 1.0, 2.0, 3.0]), True, {1}])
    def test_contrast_wrong_type(self, tiny_cnn, tiny_inputs, contrast):
        with pytest.raises(TypeError, match="contrast"):
            ContrastCAM(tiny_cnn, LAYER).attribute(tiny_inputs, contrast=contrast)

    def test_target_out_of_range(self, tiny_cnn, tiny_inputs):
        for method in (CounterfactualCAM, LayerGradCamPlusPlus):
            with pytest.raises(ValueError, match="target"):
                method(tiny_cnn, LAYER).attribute(tiny_inputs, target=[0, 1, 2, 5])

    @pytest.mark.parametrize("bad", [float("nan"), float("inf")])
    def test_non_finite_inputs(self, tiny_cnn, tiny_inputs, bad):
        tiny_inputs[1, 0, 2, 2] = bad
        with pytest.raises(ValueError, match="inputs.*NaN or infinite"):
            ContrastCAM(tiny_cnn, LAYER).attribute(tiny_inputs)

    def test_empty_batch(self, tiny_cnn, tiny_inputs):
        # Captum's own LayerGradCam fails here with an IndexError from inside its hooks
        for method in (ContrastCAM, CounterfactualCAM, GradCAM):
            with pytest.raises(ValueError, match=r"`inputs` has no examples"):
                method(tiny_cnn, LAYER).attribute(tiny_inputs[:0])

    def test_non_2d_output(self, tiny_inputs):
        model = nn.Sequential(nn.Conv2d(3, 4, 3)).double()
        with pytest.raises(ValueError, match="output_transform"):
            ContrastCAM(model, "0").attribute(tiny_inputs)

    def test_contrast_given_to_methods_without_it(self, tiny_cnn, tiny_inputs):
        for method in (CounterfactualCAM, LayerGradCamPlusPlus):
            with pytest.raises(TypeError, match="contrast"):
                method(tiny_cnn, LAYER).attribute(tiny_inputs, contrast=1)

    def test_bad_options(self, tiny_cnn, tiny_inputs):
        cam = ContrastCAM(tiny_cnn, LAYER)
        with pytest.raises(ValueError, match="normalize"):
            cam.attribute(tiny_inputs, normalize="zscore")
        with pytest.raises(TypeError, match="reshape_transform"):
            cam.attribute(tiny_inputs, reshape_transform="vit")
        with pytest.raises(ValueError, match="weighting"):
            ContrastCAM(tiny_cnn, LAYER, weighting="scorecam")
        # a layer without spatial dimensions is refused before any upsampling (issue 19)
        with pytest.raises(ValueError, match="`layer`='head.1'.*without spatial dimensions"):
            ContrastCAM(tiny_cnn, "head.1").attribute(tiny_inputs, upsample_to_input=True)
