"""CounterfactualCAM: "What if P were absent?" (Grad-CAM of the negated gradient)."""

from __future__ import annotations

from torch import Tensor

from ._cam import TargetClassCAMBase, check_weighting, gradcam_weights, target_cam


@target_cam("Counterfactual maps of ``inputs`` against the class(es) P in ``target``.")
class CounterfactualCAM(TargetClassCAMBase):
    r"""Counterfactual class activation map: "What if P were absent?".

    Grad-CAM of the negated gradient: the regions whose removal would most raise the
    confidence in P, i.e. the evidence against P.

    .. code-block:: text

        G       = - d z_P / d A                (A: K x u x v activations of `layer`)
        alpha_k = mean over (u, v) of G_k      (= - Grad-CAM's weight of P)
        map     = ReLU( sum_k alpha_k * A_k )

    ``attribute(..., gradient_sign=)`` applies to this G, the gradient the method weights:
    ``"signed"`` (the default) is the formula above, ``"positive"`` takes
    ``alpha_k = mean over (u, v) of ReLU(G_k)``, the parts of the layer where raising the
    activation lowers z_P.

    The public attribute ``weighting`` (``"gradcam"``, the default) may be set to
    ``"gradcam++"``: the Grad-CAM++ weights of G, which are Grad-CAM++'s closed form for the
    score -z_P (its derivatives of the exponential score are those of -z_P),

    .. code-block:: text

        a_kuv   = G_kuv^2 / (2 G_kuv^2 + sum_(i,j) A_kij * G_kuv^3)   (0 where G_kuv = 0)
        alpha_k = sum over (u, v) of a_kuv * ReLU(G_kuv)

    with ReLU(G) (Grad-CAM++'s positive aggregation) unless ``gradient_sign="signed"``.
    Any other value of ``weighting`` raises a ValueError at the next call.

    Paper: Selvaraju et al., "Grad-CAM", ICCV 2017 (counterfactual explanations, sec. 5);
    AlRegib & Prabhushankar, "Explanatory Paradigms in Neural Networks", IEEE SPM 2022.

    Args:
        {init_args}

    Examples::

        >>> from captum_ext.attr import CounterfactualCAM
        >>> cam = CounterfactualCAM(model, "features.7")
        >>> maps = cam.attribute(images)             # against each predicted class
    """

    def _channel_weights(
        self, gradients: Tensor, activations: Tensor, gradient_sign: str | None = None
    ) -> Tensor:
        """The weighting of the negated gradients ``-d z_P / d A`` (see the class)."""
        check_weighting(self.weighting)
        if self.weighting == "gradcam" and gradient_sign != "positive":
            # mean(-G) = -mean(G) exactly: no negated copy of the gradients
            return -gradcam_weights(gradients, activations)
        return super()._channel_weights(-gradients, activations, gradient_sign)
