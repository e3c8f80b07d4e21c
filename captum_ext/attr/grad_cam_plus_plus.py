"""Grad-CAM++ as a Captum layer attribution."""

from __future__ import annotations

from ._cam import TargetClassCAMBase, target_cam


@target_cam("Grad-CAM++ maps of ``inputs`` for the class(es) P in ``target``.")
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
        {init_args}

    Examples::

        >>> from captum_ext.attr import LayerGradCamPlusPlus
        >>> maps = LayerGradCamPlusPlus(model, "features.7").attribute(images, target=labels)
    """

    _weighting = "gradcam++"
