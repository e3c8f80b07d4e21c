r"""Finer-CAM: "What sets P apart from the classes it is most easily confused with?"."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from captum_ext._utils.caller import inside_expanding_wrapper, user_stacklevel
from captum_ext._utils.precision import at_least_float32
from captum_ext._utils.validation import (
    check_int,
    check_number,
    class_selection,
    single_logit_hint,
)

from ._cam import TargetClassCAMBase, target_cam

#: positions, in the order of logit closeness to the explained class, of the classes it is
#: compared with (position 0 is the class itself): its three nearest neighbours
DEFAULT_COMPARISON_POSITIONS = (1, 2, 3)


def finer_scores(logits: Tensor, alpha: float, positions: Sequence[int]) -> Tensor:
    r"""Finer-CAM's score of every class, ``(N, C)``.

    For class :math:`c` with logit :math:`y_c`, the comparison set :math:`S_c` holds the
    classes at ``positions`` when all classes are ordered by :math:`|y_j - y_c|` (position 0
    is :math:`c` itself), and with :math:`p = \mathrm{softmax}(y)`

    .. math::  s_c = \frac{\sum_{j \in S_c} p_j\,(y_c - \alpha\,y_j)}
                        {\sum_{j \in S_c} p_j + 10^{-9}}.

    The weights :math:`p_j` are differentiated too, as in the published implementation.
    Half-precision logits are scored in float32: the 1e-9 guard is 0 in float16, where the
    vanishing weights of a confident prediction gave 0 / 0.
    """
    logits = at_least_float32(logits)
    n, classes = logits.shape
    with torch.no_grad():
        compared = comparison_sets(logits, positions).reshape(n, -1)  # (N, C * k)
    probability = logits.softmax(dim=1)
    # gathered from the (N, C) rows themselves: a backward of O(N C k), not of N x C x C
    weights = probability.gather(1, compared).view(n, classes, -1)
    others = logits.gather(1, compared).view(n, classes, -1)
    numerator = (weights * (logits[:, :, None] - alpha * others)).sum(dim=2)
    return numerator / (weights.sum(dim=2) + 1e-9)


#: distances compared at once by :func:`comparison_sets` (N x classes of a chunk x C)
_CHUNK_ELEMENTS = 2**22


def comparison_sets(logits: Tensor, positions: Sequence[int]) -> Tensor:
    r"""For every class :math:`c`, the classes at ``positions`` when all classes are ordered
    by :math:`|y_j - y_c|` (``c`` first, ties in class order), ``(N, C, k)``: the comparison
    sets of :func:`finer_scores`.

    Each row needs only its ``max(positions) + 1`` nearest classes: the distance of the
    last of them (a k-smallest selection, not a sort of all C), every class closer than it,
    and the tied ones at it in class order. Classes are taken in chunks, so memory stays
    at about ``N x C`` per chunk (at 21,843 classes the full ``N x C x C`` orderings are
    1.9 GB per image in float32).
    """
    logits = at_least_float32(logits.detach())
    n, classes = logits.shape
    keep = max(positions) + 1
    chosen_positions = torch.tensor(list(positions), device=logits.device)
    result = torch.empty(n, classes, len(positions), dtype=torch.long, device=logits.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, n * classes))
    for start in range(0, classes, step):
        stop = min(classes, start + step)
        width = stop - start
        distance = (logits[:, None, :] - logits[:, start:stop, None]).abs()  # (N, w, C)
        # as a stable sort orders them: infinite distances before NaN ones (a NaN logit)
        distance = distance.nan_to_num(nan=math.inf, posinf=torch.finfo(distance.dtype).max)
        rows = torch.arange(width, device=logits.device)
        distance[:, rows, rows + start] = -1.0  # each class first, also beside equal logits
        threshold = distance.topk(keep, dim=2, largest=False).values[..., -1:]
        closer = distance < threshold
        tied = distance == threshold
        room = keep - closer.sum(dim=2, keepdim=True)
        chosen = closer | (tied & (tied.cumsum(dim=2) <= room))
        members = chosen.nonzero()[:, 2].view(n, width, keep)  # in class order
        order = distance.gather(2, members).argsort(dim=2, stable=True)
        result[:, start:stop] = members.gather(2, order)[..., chosen_positions]
    return result


def default_positions(classes: int) -> tuple[int, ...]:
    """The default comparison positions (1, 2, 3) that a model with ``classes`` outputs has:
    every other class below 4 classes."""
    return tuple(p for p in DEFAULT_COMPARISON_POSITIONS if p < classes)


def comparison_classes(
    logits: Tensor,
    target: Any = None,
    positions: Sequence[int] | None = None,
) -> Tensor:
    r"""The classes Finer-CAM compares each example's class P with, ``(N, len(positions))``.

    All classes ordered by :math:`|y_j - y_P|` (P first, ties in class order); the classes at
    ``positions`` of that order, as in :func:`finer_scores`.

    Args:
        logits (Tensor): ``(N, C)`` logits.
        target (int, list or Tensor, optional): the class P of each example, in Captum's
            forms: an int (every example), a list of N ints or an ``(N,)`` integer tensor;
            negative indices count from the last class. Default: None, the predictions.
        positions (sequence of int, optional): positions in the order (0 is P), each below
            C. Default: (1, 2, 3), or every other class of a model with fewer than 4.

    Returns:
        Tensor: ``(N, k)`` class indices.

    Examples::

        >>> import torch
        >>> from captum_ext.attr.finer_cam import comparison_classes
        >>> comparison_classes(torch.tensor([[5.0, 1.0, 4.0, 4.5]]))
        tensor([[3, 2, 1]])
    """
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[1] < 1:
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"`logits` must be an (N, C) tensor, got {got}.")
    logits = logits.detach()
    classes = logits.shape[1]
    if positions is None:
        positions = default_positions(classes)
    if isinstance(positions, (str, bytes)) or not isinstance(positions, Sequence):
        raise TypeError("`positions` must be a sequence of ints, e.g. (1, 2, 3).")
    positions = tuple(check_int(p, "positions", minimum=0) for p in positions)
    if not positions:
        raise ValueError("`positions` is empty; give at least one position.")
    if max(positions) >= classes:
        raise ValueError(
            f"`positions` {positions} reach beyond the model's {classes} classes (position 0 "
            "is the explained class itself)." + (single_logit_hint() if classes == 1 else "")
        )
    target, multi = class_selection(target, logits, argument="target", default="predicted")
    if multi and target.shape[1] != 1:
        raise ValueError(
            f"`target` names {target.shape[1]} classes per example; comparison_classes takes "
            "one class P per example."
        )
    distance = (logits - logits.gather(1, target)).abs()
    distance.scatter_(1, target, -1.0)  # P first, also when another class has its logit
    return distance.argsort(dim=1, stable=True)[:, list(positions)]


#: FinerCAM's constructor arguments: unlike the other target-class CAMs it scores the
#: classes of (N, C) logits against each other, so it takes no segmentation output
_FINER_CAM_INIT_ARGS = """
        forward_func (Callable or nn.Module): the model, returning (N, C) logits with
            C >= 2 classes (P is compared with the classes whose logits are closest). An
            output with more than two dimensions (a segmentation network's (N, C, H, W)) is
            refused: pass ``output_transform`` to reduce it to (N, C) scores.
        layer (nn.Module or str): the layer to explain, or its dotted name.
        device_ids (list[int], optional): as in Captum's layer methods.
        output_transform (Callable, optional): reduces the model's output to (N, C) logits
            (a dict, a tuple; or a segmentation output summed over a pixel mask).
"""

_FINER_CAM_TARGET_ARG = """
            target (int, list, Tensor or str, optional): the class P to explain, in the
                forms Captum's LayerGradCam accepts for (N, C) logits: an int or a 0-dim /
                1-element tensor (the same class for every example), a list of ints, a list
                of one-int tuples, a 1-D tensor or an (N, 1) tensor (one class per example).
                Negative indices count from the end (-1 is the last class), as in PyTorch
                indexing. Several classes per example: ``"all"``, or a 2-D tensor (or list
                of lists) of N or 1 rows of class indices. A tuple of several ints (Captum's
                index into an output of more than two dimensions) is refused: FinerCAM needs
                (N, C) logits. Default: None, the predicted class.
"""


@target_cam(
    "Finer-CAM maps of ``inputs`` for the class(es) P in ``target``.",
    init_args=_FINER_CAM_INIT_ARGS,
    target_arg=_FINER_CAM_TARGET_ARG,
)
class FinerCAM(TargetClassCAMBase):
    r"""Finer-CAM: Grad-CAM of P's logit against the classes most similar to it.

    Grad-CAM of the score :math:`s_P` of :func:`finer_scores`: P's logit minus ``alpha``
    times the logits of the classes whose logits are closest to P's, weighted by their
    probabilities. Where Grad-CAM shows everything that supports P, including what P shares
    with its look-alikes, Finer-CAM keeps what separates P from them (the fine-grained
    differences).

    .. code-block:: text

        s_P     = sum_{j in S_P} p_j (z_P - alpha z_j) / (sum_{j in S_P} p_j + 1e-9)
        alpha_k = mean over (u, v) of d s_P / d A_k
        map     = ReLU( sum_k alpha_k * A_k )

    How it relates to ContrastCAM: both contrast P with other classes, but ContrastCAM
    differentiates the cross-entropy with one chosen contrast class Q ("Why P, rather than
    Q?"), while Finer-CAM differentiates a logit difference with the classes the model finds
    closest to P, picked per example from its own logits.

    On very confident predictions (logit gaps of tens) the comparison classes' probabilities
    underflow next to the formula's 1e-9 guard and the map vanishes, as in the published
    implementation; Finer-CAM is meant for classes the model finds similar.

    Paper: Z. Zhang et al., "Finer-CAM: Spotting the Difference Reveals Finer Details for
    Visual Explanation", CVPR 2025.

    Args:
        {init_args}
        alpha (float): strength of the comparison; 0 gives Grad-CAM weighted by the
            comparison set. Default: 1.0.
        comparison_positions (sequence of int, optional): which classes P is compared with,
            as positions in the order of logit closeness to P (0 is P). Default: None,
            (1, 2, 3), or every other class of a model with fewer than 4 (a binary one:
            (1,)).

    Examples::

        >>> from captum_ext.attr import FinerCAM
        >>> maps = FinerCAM(model, "features.7").attribute(images)    # predicted class
        >>> maps.shape
        torch.Size([40, 1, 7, 7])
    """

    def __init__(
        self,
        forward_func: Callable,
        layer: Any,
        device_ids: list[int] | None = None,
        *,
        output_transform: Callable[[Any], Tensor] | None = None,
        alpha: float = 1.0,
        comparison_positions: Sequence[int] | None = None,
    ) -> None:
        super().__init__(forward_func, layer, device_ids, output_transform=output_transform)
        self.alpha = check_number(alpha, "alpha", minimum=None)
        self.comparison_positions = comparison_positions  # checked by the setter

    @property
    def _score(self) -> Callable[[Tensor], Tensor]:
        # the engine's score, bound to this object when read (not stored: a copy, such as
        # Contrastive's, would keep calling the original's and its comparison positions)
        return self._finer_score

    @property
    def comparison_positions(self) -> tuple[int, ...] | None:
        """The comparison positions given (a tuple of ints), or None for the default: (1, 2,
        3), or every other class of a model with fewer than 4. Assigning it is checked as
        the constructor's argument is, and the next call uses it as a FinerCAM built with
        it would (None: the default again)."""
        return self._comparison_positions

    @comparison_positions.setter
    def comparison_positions(self, value: Sequence[int] | None) -> None:
        if value is not None:
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                raise TypeError(
                    "`comparison_positions` must be a sequence of ints, e.g. (1, 2, 3), or "
                    f"None (the default), got {type(value).__name__}."
                )
            value = tuple(check_int(p, "comparison_positions") for p in value)
            if not value:
                raise ValueError("`comparison_positions` is empty; give at least one position.")
        self._comparison_positions = value

    def __setstate__(self, state: dict[str, Any]) -> None:
        # a FinerCAM pickled when it kept the positions in `comparison_positions` with a
        # `_default_positions` flag
        state = dict(state)
        state.pop("_score", None)  # once stored, bound to the pickled object: a property now
        if "_comparison_positions" not in state and "comparison_positions" in state:
            default = state.pop("_default_positions", False)
            positions = state.pop("comparison_positions")
            state["_comparison_positions"] = None if default else positions
        self.__dict__.update(state)

    def _positions(self, classes: int) -> tuple[int, ...]:
        """The comparison positions for a model with ``classes`` outputs: the ones given, or
        the default ones that it has (a model with 2 or 3 classes compares P with the
        others)."""
        positions = self.comparison_positions
        if positions is None:
            return default_positions(classes) if classes >= 2 else DEFAULT_COMPARISON_POSITIONS
        return positions

    def _finer_score(self, logits: Tensor) -> Tensor:
        classes = logits.shape[1]
        positions = self._positions(classes)
        if max(positions) >= classes:
            raise ValueError(
                f"`comparison_positions` {positions} reach beyond the model's "
                f"{classes} classes (position 0 is the explained class itself)."
                + (single_logit_hint() if classes == 1 else "")
            )
        return finer_scores(logits, self.alpha, positions)

    def _check_explained(self, logits: Tensor, classes: Tensor) -> bool:
        """The maps of the explained classes whose comparison classes' summed probability
        falls below the formula's 1e-9 guard vanish: say so rather than return blank maps
        silently (for the classes explained, not only the prediction)."""
        if logits.dim() != 2:
            return False
        positions = self._positions(logits.shape[1])
        probability = at_least_float32(logits).softmax(dim=1)
        n, num_classes = logits.shape
        vanishing = torch.zeros(n, dtype=torch.bool, device=logits.device)
        # the explained classes' comparison sets, 64 classes per example at a time (one
        # ordering of every class per explained class: N x 64 x C at most)
        for start in range(0, classes.shape[1], 64):
            chunk = classes[:, start : start + 64]
            width = chunk.shape[1]
            compared = comparison_classes(
                logits.repeat_interleave(width, dim=0), chunk.reshape(-1), positions
            ).view(n, width, -1)
            weight = probability[:, None, :].expand(n, width, num_classes).gather(2, compared)
            vanishing |= (weight.sum(dim=2) < 1e-7).any(dim=1)
        count = int(vanishing.sum())
        if count:
            rows = (
                "rows (noisy copies of the examples, inside a Captum wrapper)"
                if inside_expanding_wrapper()
                else "examples"
            )
            warnings.warn(
                f"FinerCAM: for {count} of {logits.shape[0]} {rows} the classes compared "
                "with the explained class have a summed probability below 1e-7, so the "
                "formula's 1e-9 guard dominates and their maps (near) vanish. Finer-CAM is "
                "meant for classes the model finds similar; for a confident prediction, or a "
                "class the model finds unlikely, use ContrastCAM or GradCAM.",
                RuntimeWarning,
                stacklevel=user_stacklevel(),
            )
        return count == n
