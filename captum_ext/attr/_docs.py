"""Argument descriptions shared by the CAM docstrings (kept in one place)."""

CAM_ARGS = """
            additional_forward_args (Any, optional): extra arguments for forward_func, after
                the inputs. Default: None.
            attribute_to_layer_input (bool, optional): explain the layer's input instead of
                its output. Default: False.
            relu_attributions (bool, optional): apply ReLU to the maps, as in the paper.
                Default: True.
            reshape_transform (Callable, optional): maps token activations (N, tokens, K) of
                a vision transformer to (N, K, h, w), e.g. drop the class token and fold the
                rest into a grid. Applied to activations and gradients alike. Default: None.
            upsample_to_input (bool, optional): bilinearly upsample the maps to the spatial
                size of the input (``LayerAttribution.interpolate``'s convention).
                Default: False.
            normalize (str, optional): ``"minmax"`` scales each map to [0, 1] (a constant map
                becomes zeros, never NaN). With ``upsample_to_input=True`` this is the
                published post-processing. Default: None (raw maps, like LayerGradCam).
            max_batch (int, optional): classes per batched backward when several classes
                are requested per example; bounds memory. Default: 64 (fewer if one chunk
                would exceed about 1 GiB).
"""

CAM_RETURNS = """
        Returns:
            Tensor: maps of shape (N, 1, h, w) for one class per example (as LayerGradCam),
            or (N, C', h, w) when several classes per example were requested (``"all"`` or a
            2-D selection), in the order requested. (h, w) is the layer's spatial size, or the
            input's with ``upsample_to_input=True``. A tuple of such tensors when the layer
            has several tensor inputs and ``attribute_to_layer_input=True``.
"""


def with_cam_args(function):
    """Fill the shared ``{cam_args}`` / ``{cam_returns}`` slots of a docstring."""
    function.__doc__ = function.__doc__.replace("{cam_args}", CAM_ARGS.strip()).replace(
        "{cam_returns}", CAM_RETURNS.strip()
    )
    return function
