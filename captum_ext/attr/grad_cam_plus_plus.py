"""Grad-CAM++ as a Captum layer attribution."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from captum.log import log_usage
from torch import Tensor

from ._cam import TargetClassCAMBase
from ._docs import with_cam_args


class LayerGradCamPlusPlus(TargetClassCAMBase):
    r"""Grad-CAM++: pixel-weighted gradients for the channel weights.

    With G = d z_P / d A and A the K x u x v activations of ``layer``:

    .. code-block:: text

        a_kuv   = G_kuv^2 / (2 G_kuv^2 + sum_(i,j) A_kij * G_kuv^3)   (0 where G_kuv = 0)
        alpha_k = sum over (u, v) of a_kuv * ReLU(G_kuv)
        map     = ReLU( sum_k alpha_k * A_k )

    (the closed form of the paper for an exponential of the score). The contrastive form,
    the same weighting of d CE(z, Q) / d A, is ``ContrastCAM(..., weighting="gradcam++")``.

    Paper: Chattopadhay, Sarkar, Howlader & Balasubramanian, "Grad-CAM++: Generalized
    Gradient-Based Visual Explanations for Deep Convolutional Networks", WACV 2018.

    Args:
        forward_func (Callable or nn.Module): the model, returning (N, C) logits, or an
            output with more than two dimensions (a segmentation network's (N, C, H, W)),
            whose elements Captum's tuple targets select (see docs/segmentation.md).
        layer (nn.Module or str): the layer to explain, or its dotted name.
        device_ids (list[int], optional): as in Captum's layer methods.
        output_transform (Callable, optional): reduces the model's output to (N, C) scores
            (a dict, a tuple; or a segmentation output summed over a pixel mask).

    Examples::

        >>> from captum_ext.attr import LayerGradCamPlusPlus
        >>> maps = LayerGradCamPlusPlus(model, "features.7").attribute(images, target=labels)
    """

    _weighting = "gradcam++"

    @log_usage()
    @with_cam_args
    def attribute(
        self,
        inputs: Tensor | tuple[Tensor, ...],
        target: Any = None,
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
    ) -> Tensor | tuple[Tensor, ...]:
        r"""Grad-CAM++ maps of ``inputs`` for the class(es) P in ``target``.

        Args:
            inputs (Tensor or tuple[Tensor, ...]): a batch, examples first.
            {target_arg}
            {cam_args}

        {cam_returns}
        """
        return self._maps(
            inputs,
            target,
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
        )
