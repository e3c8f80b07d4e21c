"""Grad-CAM on the shared engine: many targets per pass, published post-processing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from captum.log import log_usage
from torch import Tensor

from ._cam import TargetClassCAMBase
from ._docs import with_cam_args


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

    Paper: Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via
    Gradient-based Localization", ICCV 2017.

    Args:
        forward_func (Callable or nn.Module): the model, returning (N, C) logits, or an
            output with more than two dimensions (a segmentation network's (N, C, H, W)),
            whose elements Captum's tuple targets select (see docs/segmentation.md).
        layer (nn.Module or str): the layer to explain, or its dotted name.
        device_ids (list[int], optional): as in Captum's layer methods.
        output_transform (Callable, optional): reduces the model's output to (N, C) scores
            (a dict, a tuple; or a segmentation output summed over a pixel mask).

    Examples::

        >>> from captum_ext.attr import GradCAM
        >>> maps = GradCAM(model, "features.7").attribute(images)        # predicted class
        >>> every = GradCAM(model, "features.7").attribute(images, "all")  # N x 10 x 7 x 7
    """

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
        r"""Grad-CAM maps of ``inputs`` for the class(es) P in ``target``.

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
