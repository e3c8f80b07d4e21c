"""CounterfactualCAM: "What if P were absent?" (Grad-CAM with negated weights)."""

from __future__ import annotations

from torch import Tensor

from ._cam import TargetClassCAMBase, gradcam_weights, target_cam


@target_cam("Counterfactual maps of ``inputs`` against the class(es) P in ``target``.")
class CounterfactualCAM(TargetClassCAMBase):
    r"""Counterfactual class activation map: "What if P were absent?".

    Grad-CAM with negated weights: the regions whose removal would most raise the
    confidence in P, i.e. the evidence against P.

    .. code-block:: text

        alpha_k = - mean over (u, v) of d z_P / d A_k
        map     = ReLU( sum_k alpha_k * A_k )

    Paper: Selvaraju et al., "Grad-CAM", ICCV 2017 (counterfactual explanations, sec. 5);
    AlRegib & Prabhushankar, "Explanatory Paradigms in Neural Networks", IEEE SPM 2022.

    Args:
        {init_args}

    Examples::

        >>> from captum_ext.attr import CounterfactualCAM
        >>> cam = CounterfactualCAM(model, "features.7")
        >>> maps = cam.attribute(images)             # against each predicted class
    """

    def _channel_weights(self, gradients: Tensor, activations: Tensor) -> Tensor:
        return -gradcam_weights(gradients, activations)
