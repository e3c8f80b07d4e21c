r"""Heatmap masking: the score of the target on the input multiplied by its heatmap."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from captum.log import log_usage
from torch import Tensor

from captum_ext._utils.deprecation import renamed_arguments
from captum_ext.metrics._perturbation import (
    Evaluator,
    check_score,
    evaluation,
    image_batch,
    keyword_only_after,
    maps_for,
    score_dtype,
)

__all__ = ["masking_score"]


@keyword_only_after(3)
@renamed_arguments(heatmaps="attributions")
@log_usage()
def masking_score(
    forward_func: Callable,
    inputs: Tensor | tuple[Tensor],
    attributions: Tensor | tuple[Tensor],
    *,
    target: Any = None,
    score: str = "probability",
    additional_forward_args: Any = None,
) -> Tensor:
    r"""Score of the target on the input multiplied by the heatmap.

    .. code-block:: text

        S_x   = x * heatmap                 (heatmap in [0, 1] at input size, all channels)
        score = softmax(f(S_x))[target]     ("probability")
              | 1[argmax f(S_x) == target]  ("correct", alias "accuracy")

    With the default target (the class predicted on ``x``), ``"correct"`` says whether the
    original prediction survives the masking. The score favours large explanations (a
    heatmap of ones scores like the input itself); read it beside deletion / insertion.

    Paper: AlRegib & Prabhushankar, "Inferential Machine Learning", WACV 2025 tutorial;
    the same quantity as pytorch-grad-cam's ``CamMultImageConfidenceChange`` without the
    difference to the unmasked score.

    Args:
        forward_func (Callable or nn.Module): the model, returning (N, C) logits. It runs
            under ``torch.no_grad`` and, when it is an ``nn.Module`` (or a bound method of
            one), in eval mode; its train/eval and gradient flags are restored afterwards.
        inputs (Tensor): images (N, C, H, W), floating point (a 1-tuple is accepted). The
            masked images keep their dtype, so the model sees one dtype with or without
            ``target`` (float32 images reach a float16 / bfloat16 model in its dtype).
        attributions (Tensor): the heatmaps, values in [0, 1], (N, 1, h, w) or (N, h, w) (upsampled
            bilinearly to H x W and applied to every channel) or (N, C, H, W).
        target (int, list, Tensor, optional): the class scored, one per example.
            Default: None, the class predicted on the unmasked input.
        score (str, optional): ``"probability"`` (default) or ``"correct"``.
        additional_forward_args (Any, optional): passed to ``forward_func`` after the
            images, one masked image per example in the examples' order, so tensors whose
            first dimension is N (also inside tuples, lists, mappings and dataclasses) keep
            their rows as given.

    Returns:
        Tensor: (N,) one score per example, on the inputs' device.

    Examples::

        >>> from captum.attr import LayerGradCam
        >>> from captum_ext.bundled import load_bundled_model
        >>> from captum_ext.data import BUNDLED_CAM_LAYER, load_sample_digits
        >>> from captum_ext.metrics import masking_score
        >>> model = load_bundled_model()
        >>> images, labels = load_sample_digits()
        >>> cam = LayerGradCam(model, model.get_submodule(BUNDLED_CAM_LAYER))
        >>> maps = cam.attribute(images[:8], target=labels[:8], relu_attributions=True)
        >>> heat = maps / maps.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12)
        >>> masking_score(model, images[:8], heat).shape
        torch.Size([8])
    """
    x = image_batch(inputs)
    check_score(score)
    heat = maps_for(attributions, x, "attributions", dtype=score_dtype(x))
    # the maps as given (a resized map could skip or round at the values out of range)
    given = (attributions[0] if isinstance(attributions, tuple) else attributions).detach()
    if bool((given < 0).any()) or bool((given > 1).any()):
        raise ValueError(
            "`attributions` (the heatmaps) must lie in [0, 1], got values in "
            f"[{float(given.min()):.9g}, {float(given.max()):.9g}]; min-max normalise them "
            "first."
        )
    n = x.shape[0]
    evaluator = Evaluator(forward_func, x, target, additional_forward_args)
    with evaluation(forward_func):
        if target is None:
            evaluator.original(x)
        # the masked images in the images' dtype, as the unmasked ones (the product formed in
        # the heatmap's float32 at least, rounded once): the model sees one dtype with or
        # without a target; float32 images still reach a half-precision model in its dtype
        masked = (x * heat).to(x.dtype)
        probability, correct = evaluator(masked, torch.arange(n, device=x.device))
    value = probability if score == "probability" else correct
    return value.to(device=x.device)
