"""NoiseTunnel around our methods (and ours around NoiseTunnel), against a loop that draws
NoiseTunnel's noise the way NoiseTunnel draws it and explains every noisy copy alone (so the
order in which per-example ``contrast``/``target`` values meet the noisy copies is tested, not
only the shapes)."""

from __future__ import annotations

import pytest
import torch
from _interop import (
    BATCH_SIZES,
    CAM_CLASSES,
    LAYER,
    PAIRS_5,
    PER_EXAMPLE,
    TwoInputNet,
    make_inputs,
    per_example,
    saliency_of_cross_entropy,
    tiny_batch,
)
from captum.attr import (
    GuidedBackprop,
    IntegratedGradients,
    LayerGradCam,
    NoiseTunnel,
    Saliency,
)

from captum_ext.attr import (
    ContrastCAM,
    Contrastive,
)

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


# ------------------------------------------------------------------ 3. NoiseTunnel


CONTRAST_FORMS = {
    "list": PER_EXAMPLE,
    "tensor": torch.tensor(PER_EXAMPLE),
    "list-of-1-tuples": [(q,) for q in PER_EXAMPLE],
    "all": "all",
    "2d-per-example": torch.tensor([[1, 3], [0, 0], [4, 2], [2, 1]]),
}


def contrast_forms(n: int) -> dict:
    """CONTRAST_FORMS for an n-example batch (n <= 5)."""
    classes = per_example(n)
    return {
        "list": classes,
        "tensor": torch.tensor(classes),
        "list-of-1-tuples": [(q,) for q in classes],
        "all": "all",
        "2d-per-example": torch.tensor(PAIRS_5[:n]),
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


@pytest.mark.parametrize("n", BATCH_SIZES)
@pytest.mark.parametrize("nt_type", ["smoothgrad", "vargrad"])
@pytest.mark.parametrize("form", list(CONTRAST_FORMS))
def test_contrast_cam_in_noise_tunnel_matches_hand_loop(nt_type, form, n, tiny_cnn):
    contrast = contrast_forms(n)[form]
    tiny_inputs = tiny_batch(n)
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
