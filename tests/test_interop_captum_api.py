"""Our methods as Captum citizens: the API Captum reads (``log_usage`` on ``attribute``,
``forward_func``/``layer``/``multiplies_by_inputs``/``has_convergence_delta``) and Captum's
utilities on our maps (``LayerAttribution.interpolate``, ``visualize_image_attr``)."""

from __future__ import annotations

import pytest
import torch
from _interop import (
    CAM_CLASSES,
    LAYER,
    PER_EXAMPLE,
    make_inputs,
    pooled_model,
)
from captum.attr import (
    GuidedBackprop,
    IntegratedGradients,
    LayerAttribution,
    NoiseTunnel,
    Saliency,
)

from captum_ext.attr import (
    ContrastCAM,
    Contrastive,
    CounterfactualCAM,
    LayerGradCamPlusPlus,
)

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
