"""Argument descriptions shared by the CAM docstrings (kept in one place)."""

TARGET_ARG = """
            target (int, tuple, list, Tensor or str, optional): the class P to explain, in
                every form Captum's LayerGradCam accepts. For (N, C) logits: an int or a 0-dim
                / 1-element tensor (the same class for every example), a list of ints, a list
                of one-int tuples or a 1-D tensor (one class per example). For outputs with
                more than two dimensions, such as a segmentation network's (N, C, H, W): a
                tuple ``(c, h, w)`` (the element ``output[n, c, h, w]`` of every example) or a
                list of N such tuples (one per example). Negative indices count from the end
                (-1 is the last class), as in PyTorch indexing; Captum itself accepts them in
                ints and tuples only, here every form does. Several classes per example (only
                for (N, C) logits): ``"all"``, or a 2-D tensor (or list of lists) of N or 1
                rows of class indices; a list of tuples never means that. Default: None, the
                predicted class (an output of more than two dimensions needs a target).
"""

CONTRAST_ARG = """
            contrast (int, tuple, list, Tensor or str, optional): the contrast class Q, in
                the same forms as Captum's ``target``. For (N, C) logits: an int (the same Q
                for all), a list of ints or of one-int tuples or a 1-D tensor (one Q per
                example), ``"all"`` (one map per class), or a 2-D tensor / list of lists (N or
                1 rows) of several classes per example; a list of tuples never means several
                classes. For an output ``(N, C, *positions)`` (a segmentation network's
                (N, C, H, W)) dimension 1 is the class axis: the tuple ``(q, h, w)`` (for
                every example) or a list of N such tuples (one per example) asks "why this
                pixel's prediction rather than class q?", with the cross-entropy of the logits
                ``output[n, :, h, w]`` at that position and label q. Negative indices count
                from the end. Default: None, the second most likely class of each example
                (an output of more than two dimensions needs an explicit contrast). Inside
                NoiseTunnel, ``infidelity`` and ``sensitivity_max`` a per-example
                ``contrast`` of length N is expanded with the inputs (``repeat_interleave``);
                there a list of another length that divides the expanded batch cannot be
                told from it and is repeated too, so give one entry per example. In a direct
                call a length other than N or 1 is refused.
"""

CAM_ARGS = """
            additional_forward_args (Any, optional): extra arguments for forward_func, after
                the inputs. Default: None.
            attribute_to_layer_input (bool, optional): explain the layer's input instead of
                its output. Default: False.
            relu_attributions (bool, optional): apply ReLU to the maps, as in the paper.
                Default: True.
            reshape_transform (Callable, optional): maps token activations (N, tokens, K) of
                a vision transformer to (N, K, h, w), e.g. drop the class token and fold the
                rest into a grid. Applied to activations and gradients alike. A tokens-first
                layer (T, N, K), such as ``nn.TransformerEncoderLayer`` with
                ``batch_first=False``, works with a transform that moves the examples first
                (e.g. ``lambda t: fold(t.transpose(0, 1))``). Default: None.
            upsample_to_input (bool, optional): upsample the maps to the spatial size of the
                input, with ``interpolate_mode``. Default: False.
            normalize (str, optional): ``"minmax"`` scales each map to [0, 1] (a constant map
                becomes zeros, never NaN). With ``upsample_to_input=True`` this is the
                published post-processing. Default: None (raw maps, like LayerGradCam).
            max_batch (int, optional): classes per batched backward when several classes
                are requested per example; bounds memory (lower it if memory runs out).
                Default: 64, fewer where one chunk would need more than about 1 GiB (its
                gradients and the backward pass's working memory, estimated from the
                sizes of the module outputs it goes through).
            attr_dim_summation (bool, optional): as in Captum's LayerGradCam: True sums the
                weighted activations over the channel dimension (one map per class); False
                returns the per-channel maps ``alpha_k * A_k`` (ReLU applied to each when
                ``relu_attributions``), of shape (N, K, h, w) for one class per example.
                Default: True.
            grad_kwargs (dict, optional): as in Captum's LayerGradCam, extra keywords for
                ``torch.autograd.grad``: ``retain_graph``, ``allow_unused`` (False raises
                torch's error when the output does not depend on the layer, instead of zero
                maps) and ``materialize_grads`` are passed on. ``create_graph=True`` is
                refused (the backward pass stops at the layer, so the maps cannot be
                differentiated; use Captum's LayerGradCam for that), and so are the arguments
                the engine sets (``outputs``, ``inputs``, ``grad_outputs``,
                ``is_grads_batched``). Default: None.
            interpolate_mode (str, optional): the ``torch.nn.functional.interpolate`` mode of
                ``upsample_to_input``. Default: None, bilinear (linear / trilinear for 1 / 3
                spatial dimensions) with ``align_corners=False``, as the published
                post-processing, and equal to ``LayerAttribution.interpolate(maps, size,
                interpolate_mode="bilinear")`` up to rounding: the linear modes are computed
                one axis at a time by ``torch.lerp``, so a constant map, a plateau and
                mirror-symmetric pixels stay exactly equal, which ``F.interpolate``'s
                weighted sums break by an ulp (enough to reorder a deletion curve). Note
                that ``LayerAttribution.interpolate``'s own default is ``"nearest"``, whose
                blocky maps differ from the bilinear ones (on the bundled digit model, 7x7
                maps upsampled to 28x28 and min-max normalised differ by up to 0.57 per
                pixel, 0.06 on average); pass
                ``interpolate_mode="nearest"`` to match it.
            gradient_sign (str, optional): which part of the gradient G that the method
                weights (``d z_P / d A`` for GradCAM and LayerGradCamPlusPlus,
                ``d CE(z, Q) / d A`` for ContrastCAM, ``d s_P / d A`` for FinerCAM, the
                negated ``-d z_P / d A`` for CounterfactualCAM) enters the channel weights
                (Khakzar, Baselizadeh & Navab, "Rethinking positive aggregation and
                propagation of gradients in gradient-based saliency methods", ICML 2020
                Workshop on Human Interpretability in Machine Learning). ``"signed"``: G as
                it is (Grad-CAM's weighting ``alpha_k = mean_(u,v) G_k``, Grad-CAM++'s
                ``alpha_k = sum_(u,v) a_kuv * G_kuv``). ``"positive"``: only its positive
                part (``mean_(u,v) ReLU(G_k)``, ``sum_(u,v) a_kuv * ReLU(G_kuv)``).
                Positive aggregation is known to make maps insensitive to the class
                explained (and to the randomisation of the model's parameters):
                :func:`captum_ext.metrics.class_sensitivity` measures it. Default: None,
                the method's published choice: ``"signed"`` for Grad-CAM's weighting
                (GradCAM, ContrastCAM, CounterfactualCAM, FinerCAM), ``"positive"`` for
                Grad-CAM++'s (LayerGradCamPlusPlus, ``weighting="gradcam++"``). Other
                values raise a ValueError.
"""

CAM_RETURNS = """
        Returns:
            Tensor: maps of shape (N, 1, h, w) for one class per example (as LayerGradCam),
            or (N, C', h, w) when several classes per example were requested (``"all"`` or a
            2-D selection), in the order requested. With ``attr_dim_summation=False`` the
            per-channel maps (N, K, h, w), or (N, C', K, h, w) for several classes. (h, w) is
            the layer's spatial size, or the input's with ``upsample_to_input=True``. A tuple
            of such tensors when the layer has several tensor inputs and
            ``attribute_to_layer_input=True``.
"""


def with_cam_args(function):
    """Fill the shared ``{target_arg}`` / ``{contrast_arg}`` / ``{cam_args}`` /
    ``{cam_returns}`` slots of a docstring."""
    function.__doc__ = (
        function.__doc__.replace("{target_arg}", TARGET_ARG.strip())
        .replace("{contrast_arg}", CONTRAST_ARG.strip())
        .replace("{cam_args}", CAM_ARGS.strip())
        .replace("{cam_returns}", CAM_RETURNS.strip())
    )
    return function
