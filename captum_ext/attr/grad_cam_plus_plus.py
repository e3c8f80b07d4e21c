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

    ``attribute(..., gradient_sign="signed")`` drops the ReLU of the aggregation,
    ``alpha_k = sum over (u, v) of a_kuv * G_kuv``; the default (None, or ``"positive"``)
    is the published weights above.

    .. warning::

        Aggregating only the positive gradients, ReLU(G_kuv) above, is known to make the
        maps insensitive to the class explained and to the randomisation of the model's
        parameters (Khakzar, Baselizadeh & Navab, "Rethinking positive aggregation and
        propagation of gradients in gradient-based saliency methods", 2020). On the
        bundled digit model (layer ``"features.7"``, its 40 sample digits, maps of the
        predicted class against those of the runner-up),
        :func:`captum_ext.metrics.class_sensitivity` gives a mean ``spearman_abs`` of 0.734
        and ``ssim`` of 0.528 for Grad-CAM++ (1 = identical maps for the two classes),
        against 0.506 / 0.368 for Grad-CAM and 0.473 / 0.317 for Grad-CAM++ with
        ``gradient_sign="signed"``. Check your model with ``class_sensitivity``, and prefer
        ``gradient_sign="signed"`` (or Grad-CAM) where the maps must depend on the class.

    Paper: Chattopadhay, Sarkar, Howlader & Balasubramanian, "Grad-CAM++: Generalized
    Gradient-Based Visual Explanations for Deep Convolutional Networks", WACV 2018.

    Args:
        {init_args}

    Examples::

        >>> from captum_ext.attr import LayerGradCamPlusPlus
        >>> maps = LayerGradCamPlusPlus(model, "features.7").attribute(images, target=labels)
    """

    _weighting = "gradcam++"
