"""Our methods as Captum citizens: one group of tests per point of CAPTUM_INTEROP.md.

Every comparison is against an independent computation: the examples one by one, Captum's own
LayerGradCam, the gradient by hand, or a loop that draws NoiseTunnel's noise the way
NoiseTunnel draws it (so the order in which per-example ``contrast``/``target`` values are
matched to the noisy copies is tested, not only the shapes).
"""

from __future__ import annotations

import gc
import warnings
import weakref

import pytest
import torch
from captum.attr import (
    GuidedBackprop,
    IntegratedGradients,
    LayerAttribution,
    LayerGradCam,
    NoiseTunnel,
    Saliency,
)
from captum.metrics import infidelity, sensitivity_max
from conftest import assert_model_unchanged, make_tiny_cnn, model_snapshot
from torch import nn

from captum_ext.attr import (
    ContrastCAM,
    Contrastive,
    ContrastiveForward,
    CounterfactualCAM,
    LayerGradCamPlusPlus,
)

LAYER = "features.3"
NUM_CLASSES = 5
PER_EXAMPLE = [1, 0, 4, 2]  # one class per example of the 4-example tiny batch

CAM_CLASSES = {
    "contrast": ContrastCAM,
    "counterfactual": CounterfactualCAM,
    "gradcam++": LayerGradCamPlusPlus,
}


def class_keyword(method) -> str:
    return "contrast" if isinstance(method, ContrastCAM) else "target"


def make_inputs(n: int = 4, size: int = 6, seed: int = 1, channels: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, channels, size, size, generator=generator, dtype=torch.float64)


def pooled_model() -> nn.Module:
    """Average-pool by 2, then the tiny CNN: the layer ``1.features.3`` is half the input size."""
    return nn.Sequential(nn.AvgPool2d(2), make_tiny_cnn()).eval()


def cross_entropy_rows(model, x):
    return -torch.log_softmax(model(x), dim=1)


def saliency_of_cross_entropy(model, row: torch.Tensor, q: int) -> torch.Tensor:
    """|d CE(f(x), q) / dx| by hand, for one example."""
    leaf = row.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(cross_entropy_rows(model, leaf)[0, q], leaf)
    return grad.abs()


# ------------------------------------------------------------------ NoiseTunnel by hand


def nt_partitions(nt_samples: int, batch: int | None) -> list[int]:
    batch = nt_samples if batch is None else min(batch, nt_samples)
    sizes = [batch] * (nt_samples // batch)
    if nt_samples % batch:
        sizes.append(nt_samples % batch)
    return sizes


def noisy_copies(inputs: tuple, stdevs: tuple, k: int) -> tuple:
    """What NoiseTunnel feeds the method for one partition of ``k`` samples per example.

    Each example is repeated ``k`` times in a row (repeat_interleave) and gets Gaussian noise
    from the global generator: one ``torch.normal`` draw per input tensor, in input order, with
    a standard-deviation tensor built in the default dtype.
    """
    out = []
    for x, stdev in zip(inputs, stdevs):
        size = (x.shape[0] * k, *x.shape[1:])
        noise = torch.normal(0, torch.tensor(stdev).repeat(size))
        out.append(x.repeat_interleave(k, dim=0) + noise)
    return tuple(out)


def noise_tunnel_by_hand(explain_row, inputs, *, nt_type, nt_samples, batch, stdevs, seed):
    """Seed, draw the noise as NoiseTunnel does, explain every noisy copy ALONE, aggregate.

    ``explain_row(rows, i)`` explains the one-example tuple ``rows``, a noisy copy of
    example ``i`` (so per-example arguments are looked up by the example index, not by the
    position in a batch).
    """
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    stdevs = stdevs if isinstance(stdevs, tuple) else (stdevs,) * len(inputs)
    n = inputs[0].shape[0]
    samples: list[list[torch.Tensor]] = [[] for _ in range(n)]
    torch.manual_seed(seed)
    for k in nt_partitions(nt_samples, batch):
        noisy = noisy_copies(inputs, stdevs, k)
        for row in range(n * k):
            example = row // k
            rows = tuple(t[row : row + 1] for t in noisy)
            samples[example].append(explain_row(rows, example).detach())
    stacked = torch.stack([torch.cat(s) for s in samples])  # (n, nt_samples, ...)
    mean = stacked.mean(dim=1)
    if nt_type == "smoothgrad":
        return mean
    assert nt_type == "vargrad"
    return (stacked**2).mean(dim=1) - mean**2


# ------------------------------------------------------------------ 1. log_usage


@pytest.mark.parametrize(
    "method",
    [
        lambda m: ContrastCAM(m, LAYER),
        lambda m: CounterfactualCAM(m, LAYER),
        lambda m: LayerGradCamPlusPlus(m, LAYER),
        lambda m: Contrastive(Saliency, m),
    ],
)
def test_attribute_is_decorated_with_log_usage(method, tiny_cnn):
    attribute = type(method(tiny_cnn)).attribute
    assert callable(getattr(attribute, "__wrapped__", None))


# ------------------------------------------------------------------ 3. NoiseTunnel


CONTRAST_FORMS = {
    "list": PER_EXAMPLE,
    "tensor": torch.tensor(PER_EXAMPLE),
    "list-of-1-tuples": [(q,) for q in PER_EXAMPLE],
    "all": "all",
    "2d-per-example": torch.tensor([[1, 3], [0, 0], [4, 2], [2, 1]]),
}


def contrast_of_example(contrast, i):
    if isinstance(contrast, str):
        return contrast
    row = contrast[i]
    if isinstance(row, tuple):
        return row[0]
    if isinstance(row, torch.Tensor) and row.dim() == 1:
        return row.unsqueeze(0)  # one row of a 2-D selection
    return int(row)


@pytest.mark.parametrize("nt_type", ["smoothgrad", "vargrad"])
@pytest.mark.parametrize("form", list(CONTRAST_FORMS))
def test_contrast_cam_in_noise_tunnel_matches_hand_loop(nt_type, form, tiny_cnn, tiny_inputs):
    contrast = CONTRAST_FORMS[form]
    cam = ContrastCAM(tiny_cnn, LAYER)
    torch.manual_seed(123)
    got = NoiseTunnel(cam).attribute(
        tiny_inputs,
        nt_type=nt_type,
        nt_samples=5,
        nt_samples_batch_size=2,
        stdevs=0.3,
        contrast=contrast,
    )
    expected = noise_tunnel_by_hand(
        lambda rows, i: cam.attribute(rows[0], contrast=contrast_of_example(contrast, i)),
        tiny_inputs,
        nt_type=nt_type,
        nt_samples=5,
        batch=2,
        stdevs=0.3,
        seed=123,
    )
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    # the noise matters: the smoothed map is not the plain one
    if nt_type == "smoothgrad":
        plain = cam.attribute(tiny_inputs, contrast=contrast)
        assert not torch.allclose(got, plain)


@pytest.mark.parametrize("contrast", [PER_EXAMPLE, torch.tensor(PER_EXAMPLE), 3, None])
def test_noise_tunnel_with_zero_noise_equals_the_plain_call(contrast, tiny_cnn, tiny_inputs):
    cam = ContrastCAM(tiny_cnn, LAYER)
    got = NoiseTunnel(cam).attribute(
        tiny_inputs, nt_samples=3, nt_samples_batch_size=2, stdevs=0.0, contrast=contrast
    )
    torch.testing.assert_close(got, cam.attribute(tiny_inputs, contrast=contrast))


@pytest.mark.parametrize("name", ["counterfactual", "gradcam++"])
def test_target_cams_in_noise_tunnel_match_hand_loop(name, tiny_cnn, tiny_inputs):
    method = CAM_CLASSES[name](tiny_cnn, LAYER)
    target = torch.tensor(PER_EXAMPLE)
    torch.manual_seed(7)
    got = NoiseTunnel(method).attribute(
        tiny_inputs,
        nt_type="vargrad",
        nt_samples=3,
        nt_samples_batch_size=2,
        stdevs=0.3,
        target=target,
    )
    expected = noise_tunnel_by_hand(
        lambda rows, i: method.attribute(rows[0], target=PER_EXAMPLE[i]),
        tiny_inputs,
        nt_type="vargrad",
        nt_samples=3,
        batch=2,
        stdevs=0.3,
        seed=7,
    )
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_noise_tunnel_with_tuple_inputs_and_per_example_forward_args():
    """NoiseTunnel expands tensor additional_forward_args itself; contrast must follow."""
    model = TwoInputNet().double().eval()
    x1, x2 = make_inputs(3, 5, seed=2), make_inputs(3, 5, seed=3, channels=2)
    shift = torch.tensor([[0.5], [-1.0], [2.0]], dtype=torch.float64)
    contrast = [4, 1, 0]
    cam = ContrastCAM(model, "mix")
    torch.manual_seed(11)
    got = NoiseTunnel(cam).attribute(
        (x1, x2),
        nt_type="smoothgrad",
        nt_samples=4,
        nt_samples_batch_size=3,
        stdevs=(0.2, 0.5),
        contrast=contrast,
        additional_forward_args=(1.5, shift),
    )
    expected = noise_tunnel_by_hand(
        lambda rows, i: cam.attribute(
            rows, contrast=contrast[i], additional_forward_args=(1.5, shift[i : i + 1])
        ),
        (x1, x2),
        nt_type="smoothgrad",
        nt_samples=4,
        batch=3,
        stdevs=(0.2, 0.5),
        seed=11,
    )
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


CONTRASTIVE_METHODS = {
    "saliency": (lambda m: Contrastive(Saliency, m), {}),
    "integrated_gradients": (lambda m: Contrastive(IntegratedGradients, m), {"n_steps": 4}),
    "guided_backprop": (lambda m: Contrastive(GuidedBackprop, m), {}),
    "layer_gradcam": (lambda m: Contrastive(LayerGradCam, m, m.features[3]), {}),
}


@pytest.mark.parametrize("nt_type", ["smoothgrad", "vargrad"])
@pytest.mark.parametrize("name", list(CONTRASTIVE_METHODS))
def test_noise_tunnel_around_contrastive_matches_hand_loop(name, nt_type, tiny_cnn, tiny_inputs):
    build, extra = CONTRASTIVE_METHODS[name]
    method = build(tiny_cnn)
    contrast = torch.tensor(PER_EXAMPLE)
    torch.manual_seed(5)
    got = NoiseTunnel(method).attribute(
        tiny_inputs,
        nt_type=nt_type,
        nt_samples=3,
        nt_samples_batch_size=2,
        stdevs=0.3,
        contrast=contrast,
        **extra,
    )
    expected = noise_tunnel_by_hand(
        lambda rows, i: method.attribute(rows[0], contrast=PER_EXAMPLE[i], **extra),
        tiny_inputs,
        nt_type=nt_type,
        nt_samples=3,
        batch=2,
        stdevs=0.3,
        seed=5,
    )
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("form", ["list-of-1-tuples", "all", "2d-per-example"])
def test_noise_tunnel_around_contrastive_with_every_contrast_form(form, tiny_cnn, tiny_inputs):
    contrast = CONTRAST_FORMS[form]
    method = Contrastive(Saliency, tiny_cnn)
    torch.manual_seed(17)
    got = NoiseTunnel(method).attribute(
        tiny_inputs, nt_samples=3, nt_samples_batch_size=2, stdevs=0.3, contrast=contrast
    )
    expected = noise_tunnel_by_hand(
        lambda rows, i: method.attribute(rows[0], contrast=contrast_of_example(contrast, i)),
        tiny_inputs,
        nt_type="smoothgrad",
        nt_samples=3,
        batch=2,
        stdevs=0.3,
        seed=17,
    )
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_noise_tunnel_around_contrastive_saliency_by_hand(tiny_cnn, tiny_inputs):
    torch.manual_seed(9)
    got = NoiseTunnel(Contrastive(Saliency(tiny_cnn))).attribute(
        tiny_inputs, nt_samples=5, nt_samples_batch_size=2, stdevs=0.3, contrast=PER_EXAMPLE
    )
    expected = noise_tunnel_by_hand(
        lambda rows, i: saliency_of_cross_entropy(tiny_cnn, rows[0], PER_EXAMPLE[i]),
        tiny_inputs,
        nt_type="smoothgrad",
        nt_samples=5,
        batch=2,
        stdevs=0.3,
        seed=9,
    )
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("nt_type", ["smoothgrad", "vargrad"])
def test_contrastive_around_noise_tunnel_by_hand(nt_type, tiny_cnn, tiny_inputs):
    torch.manual_seed(21)
    got = Contrastive(NoiseTunnel(Saliency(tiny_cnn))).attribute(
        tiny_inputs,
        contrast=PER_EXAMPLE,
        nt_type=nt_type,
        nt_samples=5,
        nt_samples_batch_size=2,
        stdevs=0.3,
    )
    expected = noise_tunnel_by_hand(
        lambda rows, i: saliency_of_cross_entropy(tiny_cnn, rows[0], PER_EXAMPLE[i]),
        tiny_inputs,
        nt_type=nt_type,
        nt_samples=5,
        batch=2,
        stdevs=0.3,
        seed=21,
    )
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_noise_tunnel_contrastive_layer_gradcam_equals_noise_tunnel_contrast_cam(
    tiny_cnn, tiny_inputs
):
    kwargs = dict(
        nt_samples=4,
        nt_samples_batch_size=3,
        stdevs=0.3,
        contrast=PER_EXAMPLE,
        relu_attributions=False,  # LayerGradCam's default; ContrastCAM's is True
    )
    torch.manual_seed(3)
    ours = NoiseTunnel(ContrastCAM(tiny_cnn, LAYER)).attribute(tiny_inputs, **kwargs)
    torch.manual_seed(3)
    wrapped = NoiseTunnel(Contrastive(LayerGradCam, tiny_cnn, tiny_cnn.features[3])).attribute(
        tiny_inputs, **kwargs
    )
    torch.testing.assert_close(ours, wrapped, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------ interpolate / visualisation


@pytest.mark.parametrize("size", [12, 13])
@pytest.mark.parametrize("contrast", [PER_EXAMPLE, "all"])
def test_layer_attribution_interpolate_equals_upsample_to_input(size, contrast):
    model = pooled_model()
    x = make_inputs(4, size)
    cam = ContrastCAM(model, "1.features.3")
    raw = cam.attribute(x, contrast=contrast)
    assert raw.shape[-2:] == (size // 2, size // 2)
    interpolated = LayerAttribution.interpolate(raw, (size, size), interpolate_mode="bilinear")
    upsampled = cam.attribute(x, contrast=contrast, upsample_to_input=True)
    assert upsampled.shape == (4, raw.shape[1], size, size)
    torch.testing.assert_close(upsampled, interpolated, rtol=0, atol=1e-14)


def test_visualize_image_attr_accepts_an_upsampled_map():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from captum.attr import visualization as viz

    model = pooled_model()
    x = make_inputs(2, 12)
    maps = ContrastCAM(model, "1.features.3").attribute(
        x, contrast=[0, 2], upsample_to_input=True, normalize="minmax"
    )
    assert maps.shape == (2, 1, 12, 12) and float(maps[0].max()) == 1.0
    image = (x[0] - x[0].min()) / (x[0].max() - x[0].min())
    attr = maps[0].permute(1, 2, 0).numpy()  # H x W x 1, as Captum's visualisation wants
    for method, sign in [("heat_map", "positive"), ("blended_heat_map", "absolute_value")]:
        figure, axis = viz.visualize_image_attr(
            attr,
            image.permute(1, 2, 0).numpy(),
            method=method,
            sign=sign,
            show_colorbar=True,
            use_pyplot=False,
        )
        assert figure is not None and axis is not None
    signed = ContrastCAM(model, "1.features.3").attribute(
        x, contrast=[1, 3], upsample_to_input=True, relu_attributions=False
    )
    figure, axis = plt.subplots()
    try:
        viz.visualize_image_attr(
            signed[1].permute(1, 2, 0).numpy(),
            method="heat_map",
            sign="all",
            plt_fig_axis=(figure, axis),
            use_pyplot=False,
        )
    finally:
        plt.close(figure)


# ------------------------------------------------------------------ metrics


class RecordingPerturbation:
    """A seeded perturbation that remembers every batch it produced (for the hand loop)."""

    def __init__(self, scale: float = 0.05, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.scale = scale
        self.batches: list[torch.Tensor] = []

    def noise(self, like: torch.Tensor) -> torch.Tensor:
        noise = self.scale * torch.randn(like.shape, generator=self.generator, dtype=like.dtype)
        self.batches.append(noise)
        return noise


@pytest.mark.parametrize("contrast_form", ["list", "tensor"])
def test_infidelity_of_contrast_cam_by_hand(contrast_form):
    """infidelity with the explained scalar CE(f(x), Q): forward = ContrastiveForward, target=Q.

    Infidelity expands ``target`` itself; the per-example Q must meet the noisy copies of its
    own example (checked by a loop over the recorded perturbations, example by example).
    """
    model = pooled_model()
    x = make_inputs(4, 12)
    contrast = PER_EXAMPLE if contrast_form == "list" else torch.tensor(PER_EXAMPLE)
    maps = ContrastCAM(model, "1.features.3").attribute(
        x, contrast=contrast, upsample_to_input=True, relu_attributions=False
    )
    attributions = maps.expand_as(x)  # infidelity wants the inputs' shape: one map per channel
    perturbation = RecordingPerturbation()

    def perturb(inputs):
        noise = perturbation.noise(inputs)
        return noise, inputs - noise

    got = infidelity(
        ContrastiveForward(model),
        perturb,
        x,
        attributions,
        target=contrast,
        n_perturb_samples=5,
        max_examples_per_batch=8,  # sub-batches of 2, 2 and 1 samples per example
    )
    assert [b.shape[0] for b in perturbation.batches] == [8, 8, 4]
    total = torch.zeros(4, dtype=torch.float64)
    with torch.no_grad():
        for noise in perturbation.batches:
            k = noise.shape[0] // 4
            for row in range(noise.shape[0]):
                i, q = row // k, PER_EXAMPLE[row // k]
                before = cross_entropy_rows(model, x[i : i + 1])[0, q]
                after = cross_entropy_rows(model, x[i : i + 1] - noise[row : row + 1])[0, q]
                explained = (attributions[i] * noise[row]).sum()
                total[i] += (explained - (before - after)) ** 2
    torch.testing.assert_close(got, total / 5, rtol=1e-9, atol=1e-14)


def _explain_as_tuple(cam):
    """What users hand to sensitivity_max for a layer method (CAPTUM_INTEROP point 5)."""

    def explain(inputs, **kwargs):
        return (cam.attribute(inputs, **kwargs),)

    return explain


@pytest.mark.parametrize("contrast_form", ["list", "tensor"])
def test_sensitivity_max_of_contrast_cam_by_hand(contrast_form):
    """sensitivity_max passes ``contrast`` unexpanded against N x k perturbed inputs."""
    model = make_tiny_cnn()
    x = make_inputs(4, 6)
    contrast = PER_EXAMPLE if contrast_form == "list" else torch.tensor(PER_EXAMPLE)
    cam = ContrastCAM(model, LAYER)
    perturbation = RecordingPerturbation(scale=0.1, seed=4)

    def perturb(inputs, radius):
        return inputs + perturbation.noise(inputs)

    got = sensitivity_max(
        _explain_as_tuple(cam),
        x,
        perturb_func=perturb,
        n_perturb_samples=5,
        max_examples_per_batch=8,
        contrast=contrast,
    )
    assert got.shape == (4,)
    assert [b.shape[0] for b in perturbation.batches] == [8, 8, 4]
    best = torch.zeros(4, dtype=torch.float64)
    for noise in perturbation.batches:
        k = noise.shape[0] // 4
        for row in range(noise.shape[0]):
            i, q = row // k, PER_EXAMPLE[row // k]
            plain = cam.attribute(x[i : i + 1], contrast=q)
            moved = cam.attribute(x[i : i + 1] + noise[row : row + 1], contrast=q)
            norm = plain.norm()
            value = (moved - plain).norm() / (norm if norm > 0 else 1.0)
            best[i] = torch.maximum(best[i], value)
    assert bool((best > 0).all())
    torch.testing.assert_close(got, best, rtol=1e-9, atol=1e-14)


def test_sensitivity_max_with_default_perturbation_equals_pre_expanded_contrast():
    """The per-example contrast equals handing each call a contrast pre-expanded the way
    sensitivity_max expands the inputs (repeat_interleave), under the same random state."""
    model = make_tiny_cnn()
    x = make_inputs(4, 6)
    cam = ContrastCAM(model, LAYER)
    contrast = torch.tensor(PER_EXAMPLE)

    def explain_pre_expanded(inputs):
        rows = inputs[0].shape[0] if isinstance(inputs, tuple) else inputs.shape[0]
        expanded = contrast.repeat_interleave(rows // 4)
        return (cam.attribute(inputs, contrast=expanded),)

    torch.manual_seed(0)
    got = sensitivity_max(
        _explain_as_tuple(cam),
        x,
        perturb_radius=0.2,
        n_perturb_samples=3,
        max_examples_per_batch=8,
        contrast=contrast,
    )
    torch.manual_seed(0)
    expected = sensitivity_max(
        explain_pre_expanded, x, perturb_radius=0.2, n_perturb_samples=3, max_examples_per_batch=8
    )
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert bool((got > 0).all())


@pytest.mark.parametrize("name", ["counterfactual", "gradcam++"])
def test_sensitivity_max_with_target_methods_runs(name, tiny_cnn, tiny_inputs):
    method = CAM_CLASSES[name](tiny_cnn, LAYER)
    torch.manual_seed(0)
    got = sensitivity_max(
        lambda inputs, **kw: (method.attribute(inputs, **kw),),
        tiny_inputs,
        n_perturb_samples=3,
        target=PER_EXAMPLE,
    )
    assert got.shape == (4,) and bool(torch.isfinite(got).all())


# ------------------------------------------------------------------ 2. no_grad


NO_GRAD_METHODS = {
    "contrast": (lambda m: ContrastCAM(m, LAYER), {"contrast": PER_EXAMPLE}),
    "contrast-all": (lambda m: ContrastCAM(m, LAYER), {"contrast": "all"}),
    "contrast++": (lambda m: ContrastCAM(m, LAYER, weighting="gradcam++"), {"contrast": 2}),
    "counterfactual": (lambda m: CounterfactualCAM(m, LAYER), {"target": PER_EXAMPLE}),
    "gradcam++": (lambda m: LayerGradCamPlusPlus(m, LAYER), {"target": "all"}),
    "contrastive-saliency": (lambda m: Contrastive(Saliency, m), {"contrast": PER_EXAMPLE}),
    "contrastive-ig": (
        lambda m: Contrastive(IntegratedGradients, m),
        {"contrast": "all", "n_steps": 4},
    ),
    "contrastive-gradcam": (
        lambda m: Contrastive(LayerGradCam, m, m.features[3]),
        {"contrast": PER_EXAMPLE},
    ),
}


@pytest.mark.parametrize("name", list(NO_GRAD_METHODS))
def test_no_grad_gives_the_same_result(name, tiny_cnn, tiny_inputs):
    build, kwargs = NO_GRAD_METHODS[name]
    method = build(tiny_cnn)
    outside = method.attribute(tiny_inputs, **kwargs)
    with torch.no_grad():
        inside = method.attribute(tiny_inputs, **kwargs)
        assert not torch.is_grad_enabled()
    torch.testing.assert_close(inside, outside, rtol=0, atol=0)
    assert torch.is_grad_enabled()


# ------------------------------------------------------------------ 4. targets in every form


TARGET_FORMS = {
    "int": (3, [3, 3, 3, 3]),
    "list": (PER_EXAMPLE, PER_EXAMPLE),
    "list-of-1-tuples": ([(q,) for q in PER_EXAMPLE], PER_EXAMPLE),
    "1-tuple": ((3,), [3, 3, 3, 3]),
    "0-dim-tensor": (torch.tensor(3), [3, 3, 3, 3]),
    "1-element-tensor": (torch.tensor([3]), [3, 3, 3, 3]),
    "per-example-tensor": (torch.tensor(PER_EXAMPLE), PER_EXAMPLE),
    "per-example-int32-tensor": (torch.tensor(PER_EXAMPLE, dtype=torch.int32), PER_EXAMPLE),
}


@pytest.mark.parametrize("form", list(TARGET_FORMS))
@pytest.mark.parametrize("name", list(CAM_CLASSES))
def test_every_target_form_equals_examples_one_by_one(name, form, tiny_cnn, tiny_inputs):
    method = CAM_CLASSES[name](tiny_cnn, LAYER)
    key = class_keyword(method)
    value, per_example = TARGET_FORMS[form]
    got = method.attribute(tiny_inputs, **{key: value}, relu_attributions=False)
    rows = [
        method.attribute(tiny_inputs[i : i + 1], **{key: c}, relu_attributions=False)
        for i, c in enumerate(per_example)
    ]
    assert got.shape == (4, 1, 6, 6)
    torch.testing.assert_close(got, torch.cat(rows), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name", list(CAM_CLASSES))
def test_multi_index_tuple_target_is_a_clear_error(name, tiny_cnn, tiny_inputs):
    """A tuple of several ints indexes outputs with more than two dimensions in Captum;
    these methods need (N, classes) logits and say so."""
    method = CAM_CLASSES[name](tiny_cnn, LAYER)
    with pytest.raises(ValueError, match="tuple"):
        method.attribute(tiny_inputs, **{class_keyword(method): (1, 2)})


def test_one_by_one_counterfactual_equals_negated_captum_gradcam(tiny_cnn, tiny_inputs):
    target = torch.tensor(PER_EXAMPLE)
    captum = LayerGradCam(tiny_cnn, tiny_cnn.features[3]).attribute(
        tiny_inputs, target=target, relu_attributions=False
    )
    ours = CounterfactualCAM(tiny_cnn, LAYER).attribute(
        tiny_inputs, target=PER_EXAMPLE, relu_attributions=False
    )
    torch.testing.assert_close(ours, -captum.detach(), rtol=1e-10, atol=1e-13)


SELECTIONS = {
    "all": ("all", [list(range(NUM_CLASSES))] * 4),
    "2d-tensor": (torch.tensor([[1, 3], [0, 0], [4, 2], [2, 1]]), [[1, 3], [0, 0], [4, 2], [2, 1]]),
    "list-of-lists": ([[1, 3], [0, 0], [4, 2], [2, 1]], [[1, 3], [0, 0], [4, 2], [2, 1]]),
    "one-row": (torch.tensor([[4, 0, 2]]), [[4, 0, 2]] * 4),
}


@pytest.mark.parametrize("selection", list(SELECTIONS))
@pytest.mark.parametrize("name", list(CAM_CLASSES))
def test_several_classes_equal_single_class_calls_stacked(name, selection, tiny_cnn, tiny_inputs):
    method = CAM_CLASSES[name](tiny_cnn, LAYER)
    key = class_keyword(method)
    value, per_example = SELECTIONS[selection]
    got = method.attribute(tiny_inputs, **{key: value}, max_batch=2)
    width = len(per_example[0])
    expected = torch.stack(
        [
            torch.cat(
                [
                    method.attribute(tiny_inputs[i : i + 1], **{key: per_example[i][j]})
                    for j in range(width)
                ],
                dim=1,
            )[0]
            for i in range(4)
        ]
    )
    assert got.shape == (4, width, 6, 6)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-13)


# ------------------------------------------------------------------ tuple inputs, extra args


class TwoInputNet(nn.Module):
    """Two image inputs, a scalar factor and an optional per-example shift: f(x1, x2, s, b)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(2, 4, 3, padding=1)
        self.mix = nn.Conv2d(8, 6, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(6, NUM_CLASSES)

    def forward(self, x1, x2, scale, shift=None):
        h = torch.cat([torch.tanh(self.a(x1)), torch.tanh(self.b(x2))], dim=1)
        h = self.act(self.mix(h))
        logits = self.fc(h.mean(dim=(2, 3))) * scale
        return logits if shift is None else logits + shift * torch.arange(NUM_CLASSES)


def test_tuple_inputs_and_additional_forward_args_against_captum_gradcam():
    model = TwoInputNet().double().eval()
    x1, x2 = make_inputs(3, 5, seed=2), make_inputs(3, 5, seed=3, channels=2)
    contrast = torch.tensor([4, 1, 0])
    for extra in [(2.5,), 2.5]:
        extra_tuple = extra if isinstance(extra, tuple) else (extra,)
        got = ContrastCAM(model, "mix").attribute(
            (x1, x2), contrast=contrast, additional_forward_args=extra, relu_attributions=False
        )
        gradcam = LayerGradCam(model, model.mix)
        per_class = torch.cat(
            [
                gradcam.attribute(
                    (x1, x2),
                    target=c,
                    additional_forward_args=extra_tuple,
                    relu_attributions=False,
                ).detach()
                for c in range(NUM_CLASSES)
            ],
            dim=1,
        )
        probs = torch.softmax(model(x1, x2, *extra_tuple), dim=1).detach()
        expected = (probs[:, :, None, None] * per_class).sum(1, keepdim=True) - per_class[
            torch.arange(3), contrast
        ].unsqueeze(1)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-13)
    # the scalar argument changes the map (it scales the logits inside the softmax)
    other = ContrastCAM(model, "mix").attribute(
        (x1, x2), contrast=contrast, additional_forward_args=0.5, relu_attributions=False
    )
    assert not torch.allclose(other, got)


@pytest.mark.parametrize("name", list(CAM_CLASSES))
def test_tuple_inputs_with_per_example_args_equal_one_by_one(name):
    model = TwoInputNet().double().eval()
    x1, x2 = make_inputs(3, 5, seed=2), make_inputs(3, 5, seed=3, channels=2)
    shift = torch.tensor([[0.5], [-1.0], [2.0]], dtype=torch.float64)
    method = CAM_CLASSES[name](model, "mix")
    key = class_keyword(method)
    classes = [4, 1, 0]
    got = method.attribute((x1, x2), **{key: classes}, additional_forward_args=(1.5, shift))
    rows = [
        method.attribute(
            (x1[i : i + 1], x2[i : i + 1]),
            **{key: classes[i]},
            additional_forward_args=(1.5, shift[i : i + 1]),
        )
        for i in range(3)
    ]
    torch.testing.assert_close(got, torch.cat(rows), rtol=1e-10, atol=1e-13)


# ------------------------------------------------------------------ 9. wrapped models


@pytest.mark.parametrize("name", list(CAM_CLASSES))
def test_plain_function_bound_forward_and_data_parallel_agree(name, tiny_cnn, tiny_inputs):
    cls = CAM_CLASSES[name]
    key = "contrast" if cls is ContrastCAM else "target"
    layer = tiny_cnn.features[3]
    reference = cls(tiny_cnn, LAYER).attribute(tiny_inputs, **{key: PER_EXAMPLE})
    parallel = nn.DataParallel(tiny_cnn)
    variants = {
        "function": cls(lambda x: tiny_cnn(x), layer),
        "bound forward": cls(tiny_cnn.forward, layer),
        "bound forward by name": cls(tiny_cnn.forward, LAYER),
        "data parallel": cls(parallel, layer),
        "data parallel by name": cls(parallel, "module." + LAYER),
    }
    before = model_snapshot(tiny_cnn)
    for label, method in variants.items():
        got = method.attribute(tiny_inputs, **{key: PER_EXAMPLE})
        torch.testing.assert_close(got, reference, rtol=0, atol=0, msg=label)
    assert_model_unchanged(tiny_cnn, before)


def test_contrastive_with_a_plain_function_and_data_parallel(tiny_cnn, tiny_inputs):
    reference = Contrastive(Saliency, tiny_cnn).attribute(tiny_inputs, contrast=PER_EXAMPLE)
    for forward in (lambda x: tiny_cnn(x), tiny_cnn.forward, nn.DataParallel(tiny_cnn)):
        got = Contrastive(Saliency, forward).attribute(tiny_inputs, contrast=PER_EXAMPLE)
        torch.testing.assert_close(got, reference, rtol=0, atol=0)


@pytest.mark.parametrize("cls", [ContrastCAM, CounterfactualCAM, LayerGradCamPlusPlus])
def test_layer_name_with_a_plain_function_is_a_clear_type_error(cls, tiny_cnn):
    with pytest.raises(TypeError, match="layer.*(module|nn.Module)"):
        cls(lambda x: tiny_cnn(x), LAYER)


# ------------------------------------------------------------------ 6. JIT


@pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:FutureWarning")
@pytest.mark.parametrize("cls", [ContrastCAM, CounterfactualCAM, LayerGradCamPlusPlus])
def test_scripted_layer_is_a_clear_type_error(cls):
    model = make_tiny_cnn()
    model.features[3] = torch.jit.script(model.features[3])
    for layer in (LAYER, model.features[3]):
        with pytest.raises(TypeError, match="(ScriptModule|TorchScript)"):
            cls(model, layer)


@pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:FutureWarning")
def test_layer_of_a_traced_model_is_a_clear_type_error(tiny_inputs):
    traced = torch.jit.trace(make_tiny_cnn(), tiny_inputs)
    with pytest.raises(TypeError, match="(ScriptModule|TorchScript)"):
        ContrastCAM(traced, LAYER)


@pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:FutureWarning")
def test_eager_model_with_scripted_head_works(tiny_inputs):
    eager = make_tiny_cnn()
    partly_scripted = make_tiny_cnn()
    partly_scripted.head = torch.jit.script(partly_scripted.head)
    partly_scripted.classifier = torch.jit.script(partly_scripted.classifier)
    before = model_snapshot(partly_scripted)
    for name, kwargs in [("contrast", {"contrast": "all"}), ("counterfactual", {"target": 2})]:
        expected = CAM_CLASSES[name](eager, LAYER).attribute(tiny_inputs, **kwargs)
        got = CAM_CLASSES[name](partly_scripted, LAYER).attribute(tiny_inputs, **kwargs)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    assert_model_unchanged(partly_scripted, before)


# ------------------------------------------------------------------ 7. leave nothing behind


class Explode(nn.Module):
    """Raises in forward (optionally only when gradients are being recorded)."""

    def __init__(self, only_with_grad: bool = False) -> None:
        super().__init__()
        self.only_with_grad = only_with_grad

    def forward(self, x):
        if not self.only_with_grad or torch.is_grad_enabled():
            raise RuntimeError("boom")
        return x


def model_raising_after_the_layer(only_with_grad: bool = False):
    model = make_tiny_cnn()
    model.head.insert(0, Explode(only_with_grad))
    return model


def model_whose_layer_raises():
    model = make_tiny_cnn()
    model.features[3].bn.register_forward_hook(lambda m, a, o: Explode()(o))
    return model


def _user_hooks_and_flags(model):
    """Give the model a state a user might have: hooks, a frozen part, a .grad, train mode."""
    model.features[0].register_forward_hook(lambda m, a, o: None)
    model.classifier.register_full_backward_hook(lambda m, gi, go: None)
    model.features[1].weight.requires_grad_(False)
    model.classifier.weight.grad = torch.ones_like(model.classifier.weight)
    model.head[3].train()  # one dropout in train mode: a "mixed" state to restore exactly
    return model


FAILURES = {
    "bad contrast": (make_tiny_cnn, {"contrast": 99}, {"target": 99}, ValueError),
    "bad contrast length": (
        make_tiny_cnn,
        {"contrast": [1, 2, 3]},
        {"target": [1, 2, 3]},
        ValueError,
    ),
    "raises after the layer": (
        model_raising_after_the_layer,
        {"contrast": 1},
        {"target": 1},
        (RuntimeError, ValueError),
    ),
    "layer raises": (
        model_whose_layer_raises,
        {"contrast": 1},
        {"target": 1},
        (RuntimeError, ValueError),
    ),
}


@pytest.mark.parametrize("failure", list(FAILURES))
@pytest.mark.parametrize("name", list(CAM_CLASSES))
def test_nothing_left_behind_after_a_failure(name, failure, tiny_inputs):
    factory, contrast_kwargs, target_kwargs, error = FAILURES[failure]
    model = _user_hooks_and_flags(factory())
    method = CAM_CLASSES[name](model, LAYER)
    kwargs = contrast_kwargs if name == "contrast" else target_kwargs
    for requires_grad in (False, True):
        x = tiny_inputs.clone().requires_grad_(requires_grad)
        before = model_snapshot(model)
        with pytest.raises(error):
            method.attribute(x, **kwargs)
        assert_model_unchanged(model, before)
        assert x.requires_grad is requires_grad and x.grad is None


@pytest.mark.parametrize("name", list(CAM_CLASSES))
def test_nothing_left_behind_after_non_finite_input(name, tiny_inputs):
    model = _user_hooks_and_flags(make_tiny_cnn())
    method = CAM_CLASSES[name](model, LAYER)
    x = tiny_inputs.clone()
    x[1, 0, 2, 2] = float("nan")
    x.requires_grad_(True)
    before = model_snapshot(model)
    with pytest.raises(ValueError, match="inputs"):
        method.attribute(x)
    assert_model_unchanged(model, before)
    assert x.requires_grad and x.grad is None


def test_nothing_left_behind_when_reshape_transform_raises(tiny_inputs):
    model = _user_hooks_and_flags(make_tiny_cnn())
    before = model_snapshot(model)

    def bad_transform(tensor):
        raise ValueError("cannot fold")

    with pytest.raises(ValueError, match="cannot fold"):
        ContrastCAM(model, LAYER).attribute(tiny_inputs, reshape_transform=bad_transform)
    assert_model_unchanged(model, before)


@pytest.mark.parametrize("name", list(CAM_CLASSES))
def test_nothing_left_behind_after_success(name, tiny_inputs):
    model = _user_hooks_and_flags(make_tiny_cnn())
    method = CAM_CLASSES[name](model, LAYER)
    for requires_grad in (False, True):
        x = tiny_inputs.clone().requires_grad_(requires_grad)
        before = model_snapshot(model)
        method.attribute(x, **{class_keyword(method): "all"})
        method.attribute(x)
        assert_model_unchanged(model, before)
        assert x.requires_grad is requires_grad and x.grad is None


@pytest.mark.parametrize(
    "build",
    [
        lambda m: Contrastive(Saliency, m),
        lambda m: Contrastive(IntegratedGradients, m),
        lambda m: Contrastive(GuidedBackprop, m),
    ],
    ids=["saliency", "integrated_gradients", "guided_backprop"],
)
def test_contrastive_leaves_inputs_and_model_alone_when_the_gradient_pass_fails(build, tiny_inputs):
    """CAPTUM_INTEROP 7: Captum's Saliency leaves requires_grad=True on the inputs after a
    failure; we do not. The model fails only while gradients are recorded (as an
    out-of-memory error in the backward-ready forward would)."""
    model = model_raising_after_the_layer(only_with_grad=True)
    method = build(model)
    x = tiny_inputs.clone()
    before = model_snapshot(model)
    with pytest.raises((RuntimeError, ValueError), match="boom"):
        method.attribute(x, contrast=PER_EXAMPLE)
    assert_model_unchanged(model, before)
    assert x.requires_grad is False and x.grad is None


def test_grad_mode_and_default_dtype_are_restored(tiny_inputs):
    model = make_tiny_cnn()
    cam = ContrastCAM(model, LAYER)
    original = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        for grad_mode in (False, True):
            with torch.set_grad_enabled(grad_mode):
                cam.attribute(tiny_inputs, contrast="all")
                with pytest.raises(ValueError):
                    cam.attribute(tiny_inputs, contrast=99)
                assert torch.is_grad_enabled() is grad_mode
                assert torch.get_default_dtype() is torch.float64
    finally:
        torch.set_default_dtype(original)


def _live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance on deprecated torch module attributes
        return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


def _tracked_tensors() -> int:
    """Tensors the cycle collector tracks, counted WITHOUT collecting first."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance on deprecated torch module attributes
        return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


def test_activations_are_freed_without_the_garbage_collector(tiny_cnn, tiny_inputs):
    """No reference cycle keeps activations (or any other tensor) alive after a call: with the
    cycle collector off, reference counting alone must free everything."""
    seen: list[weakref.ref] = []
    handle = tiny_cnn.features[3].register_forward_hook(lambda m, a, o: seen.append(weakref.ref(o)))
    cam = ContrastCAM(tiny_cnn, LAYER)

    def calls():
        for kwargs in ({"contrast": 1}, {"contrast": "all"}):
            cam.attribute(tiny_inputs, **kwargs)
        try:
            cam.attribute(tiny_inputs, contrast=99)
        except ValueError:
            pass
        else:
            raise AssertionError("contrast=99 should raise")

    try:
        calls()  # warm up
        gc.collect()
        gc.disable()
        before = _tracked_tensors()
        for _ in range(5):
            calls()
        after = _tracked_tensors()
        alive = [ref() is not None for ref in seen]
    finally:
        gc.enable()
        handle.remove()
    assert len(seen) == 18 and not any(alive)
    assert after - before <= 2, f"{after - before} tensors kept alive by reference cycles"


def test_two_hundred_calls_accumulate_nothing(tiny_cnn, tiny_inputs):
    cams = [
        (ContrastCAM(tiny_cnn, LAYER), {"contrast": "all"}),
        (CounterfactualCAM(tiny_cnn, LAYER), {"target": PER_EXAMPLE}),
        (LayerGradCamPlusPlus(tiny_cnn, LAYER), {"target": None}),
        (Contrastive(Saliency, tiny_cnn), {"contrast": PER_EXAMPLE}),
    ]
    failing = ContrastCAM(model_raising_after_the_layer(), LAYER)
    before_state = model_snapshot(tiny_cnn)

    def run(calls: int) -> None:
        for i in range(calls):
            method, kwargs = cams[i % len(cams)]
            method.attribute(tiny_inputs, **kwargs)
            if i % 10 == 0:
                with pytest.raises((RuntimeError, ValueError)):
                    failing.attribute(tiny_inputs)

    run(20)  # warm up caches (Captum's, autograd's)
    before = _live_tensors()
    run(200)
    after = _live_tensors()
    assert after - before <= 5, f"{after - before} tensors more after 200 calls"
    assert_model_unchanged(tiny_cnn, before_state)


# ------------------------------------------------------------------ 8. attributes


@pytest.mark.parametrize("name", list(CAM_CLASSES))
def test_attributes_captum_reads(name, tiny_cnn):
    forward = tiny_cnn.forward
    for layer in (LAYER, tiny_cnn.features[3]):
        method = CAM_CLASSES[name](forward, layer)
        assert method.forward_func is forward
        assert method.layer is tiny_cnn.features[3]
        assert type(method.multiplies_by_inputs) is bool
        assert type(method.has_convergence_delta()) is bool
        assert method.has_convergence_delta() is False
    noise_tunnel = NoiseTunnel(CAM_CLASSES[name](tiny_cnn, LAYER))
    assert type(noise_tunnel.multiplies_by_inputs) is bool


@pytest.mark.parametrize(
    "cls, delta",
    [(Saliency, False), (IntegratedGradients, True), (GuidedBackprop, False)],
)
def test_contrastive_attributes(cls, delta, tiny_cnn):
    method = Contrastive(cls, tiny_cnn)
    assert method.forward_func is tiny_cnn
    assert type(method.multiplies_by_inputs) is bool
    assert method.has_convergence_delta() is delta
    inner = cls(tiny_cnn)
    assert Contrastive(inner).forward_func is tiny_cnn
    assert inner.forward_func is tiny_cnn  # the given instance is not modified
