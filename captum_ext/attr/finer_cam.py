r"""Finer-CAM: "What sets P apart from the classes it is most easily confused with?"."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from contextvars import ContextVar
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


def finer_scores(
    logits: Tensor,
    alpha: float,
    positions: Sequence[int],
    *,
    classes: Tensor | None = None,
) -> Tensor:
    r"""Finer-CAM's score of every class, ``(N, C)``, or of the classes in ``classes``.

    For class :math:`c` with logit :math:`y_c`, the comparison set :math:`S_c` holds the
    classes at ``positions`` when all classes are ordered by :math:`|y_j - y_c|` (position 0
    is :math:`c` itself), and with :math:`p = \mathrm{softmax}(y)`

    .. math::  s_c = \frac{\sum_{j \in S_c} p_j\,(y_c - \alpha\,y_j)}
                        {\sum_{j \in S_c} p_j + 10^{-9}}.

    The weights :math:`p_j` are differentiated too, as in the published implementation.
    Half-precision logits are scored in float32: the 1e-9 guard is 0 in float16, where the
    vanishing weights of a confident prediction gave 0 / 0.

    Finding the comparison sets of all C classes compares each class with every other one
    (N x C x C distances: about 11 s per image at 21,841 classes on one CPU core); a CAM
    differentiates only the explained classes' scores, so ``classes`` restricts the work to
    theirs (N x C' x C).

    Args:
        logits (Tensor): ``(N, C)`` logits.
        alpha (float): the weight of the comparison classes' logits.
        positions (sequence of int): positions in the order of closeness (0 is the class
            itself), each below C.
        classes (Tensor, optional): ``(N, C')`` class indices in ``[0, C)``: only these
            classes' scores are computed (the same values, to the bit, as without
            ``classes``), and the other entries are NaN. Default: None, every class.

    Returns:
        Tensor: ``(N, C)`` scores, in at least float32.
    """
    logits = at_least_float32(logits)
    n, num_classes = logits.shape
    with torch.no_grad():
        if classes is None:
            compared = comparison_sets(logits, positions)  # (N, C, k)
        else:
            # each class compared with itself where its score is not asked for (cheap,
            # finite, and replaced by NaN below); the explained classes' own sets
            k = len(positions)
            compared = torch.arange(num_classes, device=logits.device)
            compared = compared.view(1, num_classes, 1).expand(n, num_classes, k).clone()
            explained = comparison_sets(logits, positions, classes)  # (N, C', k)
            compared.scatter_(1, classes[:, :, None].expand(-1, -1, k), explained)
        compared = compared.reshape(n, -1)  # (N, C * k)
    probability = logits.softmax(dim=1)
    # gathered from the (N, C) rows themselves: a backward of O(N C k), not of N x C x C
    weights = probability.gather(1, compared).view(n, num_classes, -1)
    others = logits.gather(1, compared).view(n, num_classes, -1)
    scaled = alpha * others
    asked = None
    if classes is not None:
        asked = torch.zeros(n, num_classes, dtype=torch.bool, device=logits.device)
        asked.scatter_(1, classes, True)
    _refuse_alpha_overflow(alpha, others, scaled, asked)
    numerator = (weights * (logits[:, :, None] - scaled)).sum(dim=2)
    scores = numerator / (weights.sum(dim=2) + 1e-9)
    if asked is None:
        return scores
    # the classes not asked for read NaN, not a score of the wrong comparison set; their
    # zero cotangents pass through `where` as zeros
    return torch.where(asked, scores, torch.full_like(scores, math.nan))


def _refuse_alpha_overflow(
    alpha: float, others: Tensor, scaled: Tensor, asked: Tensor | None
) -> None:
    """Refuse, naming ``alpha``, an ``alpha`` whose product ``scaled`` with the finite
    comparison logits ``others`` (N, C, k) overflows their dtype (every score, and the map,
    would be NaN); ``asked`` (N, C) restricts it to the classes whose scores are asked for."""
    overflowed = torch.isfinite(others) & ~torch.isfinite(scaled)
    if asked is not None:
        overflowed &= asked[:, :, None]
    if bool(overflowed.any()):
        raise ValueError(
            f"`alpha`={alpha:g} times the comparison classes' logits overflows "
            f"{scaled.dtype} (the scores and maps would be NaN); use a smaller |alpha| (the "
            "default is 1.0)."
        )


def _refuse_overflowed_maps(
    maps: Tensor | tuple[Tensor, ...],
    inputs: Any,
    alpha: float,
    largest_logit: float,
    logits_dtype: torch.dtype | None = None,
) -> None:
    """Refuse, naming ``alpha``, maps with inf or NaN values computed from finite inputs where
    ``alpha`` is their cause: a large ``alpha`` whose score is finite can still overflow the
    gradients in the model's backward pass (alpha=1e36 on a float32 CNN), which makes the
    maps NaN. ``largest_logit``: the largest finite |logit| scored; ``logits_dtype``: their
    dtype (the model's backward pass runs in it).

    The score's gradient at the logits grows as |alpha| * max(1, |z|); the model's
    backward pass multiplies it by its own gain. ``alpha`` is blamed where that product
    alone takes more than the square root of the range of the narrower of the maps' and the
    logits' dtypes (1.8e19 in float32, 256 in float16), leaving less than the rest for the
    gain. Below it the inf or NaN values
    are the model's own (a ``sqrt`` at 0 has an infinite derivative): they are returned as
    they are at alpha=1, not blamed on ``alpha``."""
    maps_list = [m for m in (maps if isinstance(maps, tuple) else (maps,)) if isinstance(m, Tensor)]
    bad = sum(int((~torch.isfinite(m)).sum()) for m in maps_list)
    if not bad:
        return
    dtypes = [m.dtype for m in maps_list if not bool(torch.isfinite(m).all())]
    dtypes += [logits_dtype] if logits_dtype is not None else []
    ranges = [torch.finfo(d).max for d in dtypes if d.is_floating_point]
    headroom = math.sqrt(min(ranges, default=math.inf))
    scale = abs(alpha) * max(1.0, largest_logit)
    if scale <= headroom:
        return  # the model's own inf or NaN gradients, as at alpha=1
    inputs_list = inputs if isinstance(inputs, tuple) else (inputs,)
    if not all(
        bool(torch.isfinite(x).all())
        for x in inputs_list
        if isinstance(x, Tensor) and x.is_floating_point()
    ):
        return  # non-finite inputs explain it
    total = sum(m.numel() for m in maps_list)
    raise ValueError(
        f"`alpha`={alpha:g}: {bad} of the {total} map values are inf or NaN for finite inputs: "
        "alpha times the comparison classes' logits overflowed in the gradients through the "
        f"model (|alpha| * max(1, largest |logit|) = {scale:.3g}, beyond {headroom:.3g}, the "
        "square root of the dtype's range); use a smaller |alpha| (the default is 1.0). If "
        "the maps are not finite at alpha=1 either, the model's own gradients are the cause."
    )


#: distances compared at once by :func:`comparison_sets` (N x classes of a chunk x C)
_CHUNK_ELEMENTS = 2**22


def comparison_sets(
    logits: Tensor, positions: Sequence[int], classes: Tensor | None = None
) -> Tensor:
    r"""For every class :math:`c` (or each one in ``classes``), the classes at ``positions``
    when all classes are ordered by :math:`|y_j - y_c|` (``c`` first, ties in class order),
    ``(N, C, k)`` (or ``(N, C', k)``): the comparison sets of :func:`finer_scores`.

    Each row needs only its ``max(positions) + 1`` nearest classes: the distance of the
    last of them (a k-smallest selection, not a sort of all C), every class closer than it,
    and the tied ones at it in class order. Classes are taken in chunks, so memory stays
    at about ``N x C`` per chunk (at 21,843 classes the full ``N x C x C`` orderings are
    1.9 GB per image in float32). The time is that of ``N x C' x C`` distances: give
    ``classes``, an ``(N, C')`` tensor of class indices in ``[0, C)``, where only some
    classes' sets are needed (row ``[n, i]`` of the result is then the set of class
    ``classes[n, i]``, the same as in the result without ``classes``).
    """
    logits = at_least_float32(logits.detach())
    n, num_classes = logits.shape
    if classes is None:
        classes = torch.arange(num_classes, device=logits.device).expand(n, num_classes)
    keep = max(positions) + 1
    chosen_positions = torch.tensor(list(positions), device=logits.device)
    total = classes.shape[1]
    result = torch.empty(n, total, len(positions), dtype=torch.long, device=logits.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, n * num_classes))
    for start in range(0, total, step):
        stop = min(total, start + step)
        width = stop - start
        own = classes[:, start:stop]  # (N, w)
        distance = (logits[:, None, :] - logits.gather(1, own)[:, :, None]).abs()  # (N, w, C)
        # as a stable sort orders them: infinite distances before NaN ones (a NaN logit)
        distance = distance.nan_to_num(nan=math.inf, posinf=torch.finfo(distance.dtype).max)
        # each class first, also beside equal logits
        distance.scatter_(2, own[:, :, None], -1.0)
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


#: the FinerCAM whose ``_maps`` runs in this thread (or task) and the classes it explains
_EXPLAINING: ContextVar[tuple[Any, Any] | None] = ContextVar("finer_cam_explaining", default=None)

#: the largest finite |logit| each score of the running ``FinerCAM._maps`` met, with the
#: logits' dtype (for :func:`_refuse_overflowed_maps`); None outside it
_LARGEST_LOGITS: ContextVar[list[tuple[float, torch.dtype]] | None] = ContextVar(
    "finer_cam_largest_logits", default=None
)

#: ``FinerCAM._finer_score``'s default: score every class
_EVERY_CLASS = object()

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

    Grad-CAM of the score :math:`s_P` of ``finer_scores``: P's logit minus ``alpha``
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

    Only the explained classes' comparison sets are found (N x C' x C logit distances for
    C' classes per example): the cost grows with C, not C x C (``target="all"`` finds every
    class's set, N x C x C).

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
        >>> # Finer-CAM explains a prediction against the classes the model finds closest
        >>> # to it: explain the digits where those keep some probability (on a near-certain
        >>> # prediction their maps vanish, and FinerCAM warns)
        >>> probabilities = model(images).softmax(1)
        >>> rivals = probabilities.topk(4).values[:, 1:].sum(1)   # the 3 closest other classes
        >>> similar = images[rivals > 1e-3]                     # 12 of the 40 digits
        >>> maps = FinerCAM(model, "features.7").attribute(similar)    # predicted class
        >>> maps.shape
        torch.Size([12, 1, 7, 7])
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
        # Contrastive's, would keep calling the original's and its comparison positions).
        # Inside this object's own `_maps` it scores only the classes its `target` explains
        # (see `_maps`); read elsewhere (VOICE), it scores every class.
        explaining = _EXPLAINING.get()
        if explaining is not None and explaining[0] is self:
            target = explaining[1]
            return lambda logits: self._finer_score(logits, target=target)
        return self._finer_score

    def _maps(self, inputs: Any, classes: Any, *args: Any, **kwargs: Any) -> Any:
        # The engine differentiates only the columns of the classes `classes` selects, so
        # the score computes only theirs: the comparison sets of every class are N x C x C
        # distances (11 s per image at 21,841 classes) where the explained ones' are N x C'
        # x C. The score resolves `classes` from the same logits by the same rule as the
        # engine; a callable selection (the engine's internal form) scores every class.
        token = _EXPLAINING.set(None if callable(classes) else (self, classes))
        largest_logits: list[tuple[float, torch.dtype]] = []
        logits_token = _LARGEST_LOGITS.set(largest_logits)
        try:
            maps = super()._maps(inputs, classes, *args, **kwargs)
        finally:
            _LARGEST_LOGITS.reset(logits_token)
            _EXPLAINING.reset(token)
        if abs(self.alpha) > 1:  # else |z_P - alpha z_j| <= 2 max |z|: no overflow of its own
            largest = max((value for value, _ in largest_logits), default=0.0)
            dtype = largest_logits[0][1] if largest_logits else None
            _refuse_overflowed_maps(maps, inputs, self.alpha, largest, dtype)
        return maps

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

    def _finer_score(self, logits: Tensor, target: Any = _EVERY_CLASS) -> Tensor:
        """:func:`finer_scores` of every class, or (given ``target``, in the forms of
        ``attribute``) of the classes it selects, the others NaN."""
        largest_logits = _LARGEST_LOGITS.get()
        if largest_logits is not None and abs(self.alpha) > 1:  # read where alpha can overflow
            with torch.no_grad():
                finite = logits.detach().abs().nan_to_num(nan=0.0, posinf=0.0)
                largest = float(finite.max()) if finite.numel() else 0.0
                largest_logits.append((largest, logits.dtype))
        classes = logits.shape[1]
        positions = self._positions(classes)
        if max(positions) >= classes:
            raise ValueError(
                f"`comparison_positions` {positions} reach beyond the model's "
                f"{classes} classes (position 0 is the explained class itself)."
                + (single_logit_hint() if classes == 1 else "")
            )
        if target is _EVERY_CLASS:
            return finer_scores(logits, self.alpha, positions)
        explained, _ = class_selection(
            target, logits, argument=self._class_argument, default=self._default_classes
        )
        return finer_scores(logits, self.alpha, positions, classes=explained)

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
