"""Grad-CAM on the shared engine: many targets per pass, published post-processing."""

from __future__ import annotations

from ._cam import TargetClassCAMBase, target_cam


@target_cam("Grad-CAM maps of ``inputs`` for the class(es) P in ``target``.")
class GradCAM(TargetClassCAMBase):
    r"""Grad-CAM: "Why P?", with every requested class from one forward pass.

    The same map as Captum's ``LayerGradCam`` with ``relu_attributions=True``:

    .. code-block:: text

        alpha_k = mean over (u, v) of d z_P / d A_k
        map     = ReLU( sum_k alpha_k * A_k )

    computed by the shared batched engine, so ``target="all"`` (or several targets per
    example) costs one forward pass and one batched backward instead of one backward per
    class, and with the post-processing options of ContrastCAM (``upsample_to_input``,
    ``normalize="minmax"``, ``reshape_transform``).

    ``attribute(..., gradient_sign="positive")`` keeps only the positive part of the
    gradients in the weights, ``alpha_k = mean over (u, v) of ReLU(d z_P / d A_k)`` (the
    positive aggregation that Khakzar et al., 2020, found to make maps insensitive to the
    class); the default (None, or ``"signed"``) is the published formula above.

    Paper: Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via
    Gradient-based Localization", ICCV 2017.

    Args:
        {init_args}

    Examples::

        >>> from captum_ext.attr import GradCAM
        >>> maps = GradCAM(model, "features.7").attribute(images)        # predicted class
        >>> every = GradCAM(model, "features.7").attribute(images, "all")  # N x 10 x 7 x 7
    """
