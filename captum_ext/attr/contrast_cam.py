"""ContrastCAM: "Why P, rather than Q?".

CounterfactualCAM lives in :mod:`captum_ext.attr.counterfactual_cam`; it stays importable from
here (re-exported without a warning, since this was its documented home).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from captum.log import log_usage
from torch import Tensor

from ._cam import ClassActivationMapBase
from ._docs import with_cam_args

# Re-exported without a warning: this was its documented home, and keeping it costs nothing.
from .counterfactual_cam import CounterfactualCAM

__all__ = ["ContrastCAM", "CounterfactualCAM"]


class ContrastCAM(ClassActivationMapBase):
    r"""Contrastive class activation map: "Why P, rather than Q?".

    The Grad-CAM recipe applied to the gradient of the cross-entropy loss with the contrast
    class Q as label, instead of the gradient of the logit of P:

    .. code-block:: text

        G       = d CE(z, Q) / d A            (A: K x u x v activations of `layer`)
        alpha_k = mean over (u, v) of G_k
        map     = ReLU( sum_k alpha_k * A_k )

    Since ``d CE(z, Q) / d z = softmax(z) - onehot(Q)``, the weights equal
    ``sum_c p_c * alpha^GradCAM_c - alpha^GradCAM_Q``: the prediction P does not enter the
    computation; the map shows the features that speak against Q (for the class the network
    prefers). ``Q == P`` is allowed and asks "why not even more confident in P?".

    With ``weighting="gradcam++"`` the Grad-CAM++ weighting is applied to the same signal
    (the contrastive form of Grad-CAM++), with its positive aggregation
    ``alpha_k = sum over (u, v) of a_kuv * ReLU(G_kuv)`` (see
    :class:`~captum_ext.attr.LayerGradCamPlusPlus`). ``attribute(..., gradient_sign=)``
    chooses the part of G that enters either weighting: ``"signed"`` (G as it is; the
    default of ``weighting="gradcam"``) or ``"positive"`` (ReLU(G); the default of
    ``weighting="gradcam++"``).

    .. warning::

        Positive aggregation of the gradients (``weighting="gradcam++"`` by default, or
        ``gradient_sign="positive"``) is known to make maps insensitive to the class
        (Khakzar, Baselizadeh & Navab, "Rethinking positive aggregation and propagation of
        gradients in gradient-based saliency methods", 2020): on the bundled digit model
        :func:`captum_ext.metrics.class_sensitivity` gives a mean ``spearman_abs`` of 0.734
        and ``ssim`` of 0.528 for Grad-CAM++ (1 = identical maps for two classes), 0.506 /
        0.368 for Grad-CAM. Pass ``gradient_sign="signed"`` with ``weighting="gradcam++"``
        where the maps must depend on the classes compared.

    Outputs with more than two dimensions (a segmentation network's (N, C, H, W)): dimension
    1 is the class axis, and ``contrast=(q, h, w)`` (or a list of N such tuples) explains the
    pixel (h, w) with ``CE(output[n, :, h, w], q)``, the softmax taken over the classes at
    that pixel. For a region, reduce the output to (N, C) scores with ``output_transform``.

    Paper: Prabhushankar, Kwon, Temel & AlRegib, "Contrastive Explanations in Neural
    Networks", ICIP 2020; AlRegib & Prabhushankar, "Explanatory Paradigms in Neural
    Networks", IEEE Signal Processing Magazine, 2022.

    Args:
        forward_func (Callable or nn.Module): the model, returning (N, C) logits, or an
            output with more than two dimensions (a segmentation network's (N, C, H, W)),
            whose elements Captum's tuple targets select (see docs/segmentation.md).
        layer (nn.Module or str): the layer to explain, or its dotted name.
        device_ids (list[int], optional): device ids when forward_func wraps an
            ``nn.DataParallel`` model without being it, as in Captum's layer methods.
        weighting (str, optional): ``"gradcam"`` (default) or ``"gradcam++"`` (positive
            aggregation of the gradients by default: see the warning above and
            ``attribute``'s ``gradient_sign``).
        output_transform (Callable, optional): reduces the model's output to (N, C) logits
            when it returns something else (a dict, a tuple, or a segmentation output summed
            over a pixel mask).

    Examples::

        >>> from captum_ext.attr import ContrastCAM
        >>> from captum_ext.bundled import load_bundled_model
        >>> from captum_ext.data import load_sample_digits
        >>> model = load_bundled_model()
        >>> images, labels = load_sample_digits()
        >>> cam = ContrastCAM(model, "features.7")
        >>> maps = cam.attribute(images[:4], contrast=[1, 2, 3, 4])   # N x 1 x 7 x 7
        >>> every = cam.attribute(images[:4], contrast="all")        # N x 10 x 7 x 7
    """

    _score = "cross_entropy"
    _default_classes = "runner_up"
    _class_argument = "contrast"

    @log_usage()
    @with_cam_args
    def attribute(
        self,
        inputs: Tensor | tuple[Tensor, ...],
        contrast: Any = None,
        additional_forward_args: Any = None,
        attribute_to_layer_input: bool = False,
        relu_attributions: bool = True,
        reshape_transform: Callable | None = None,
        upsample_to_input: bool = False,
        normalize: str | None = None,
        max_batch: int | None = None,
        attr_dim_summation: bool = True,
        grad_kwargs: dict[str, Any] | None = None,
        interpolate_mode: str | None = None,
        *,
        target: Any = None,
        gradient_sign: str | None = None,
    ) -> Tensor | tuple[Tensor, ...]:
        r"""Contrastive maps of ``inputs`` against the contrast class(es) Q.

        Args:
            inputs (Tensor or tuple[Tensor, ...]): a batch, examples first.
            {contrast_arg}
            target: not accepted. Captum's ``target`` names the class explained; ContrastCAM
                explains the network's preference against Q, given as ``contrast`` (also
                inside NoiseTunnel, which expands it). Passing ``target`` raises a TypeError
                that says so.
            {cam_args}

        {cam_returns}
        """
        if target is not None:
            raise TypeError(
                "ContrastCAM.attribute() takes the contrast class Q as `contrast`, not "
                "`target`: the map answers 'why the prediction, rather than Q?'. Pass "
                "contrast=... (also inside NoiseTunnel, infidelity and sensitivity_max, which "
                "expand a per-example contrast with the inputs); for 'why P?' use GradCAM "
                "with target=P."
            )
        return self._maps(
            inputs,
            contrast,
            additional_forward_args,
            attribute_to_layer_input,
            relu_attributions,
            reshape_transform,
            upsample_to_input,
            normalize,
            max_batch,
            attr_dim_summation,
            grad_kwargs,
            interpolate_mode,
            gradient_sign,
        )
