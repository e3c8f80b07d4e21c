"""Best of several per-image fits ("starts") of ActivationMatchingMask.

The per-image objective is not convex: fits of one image from different initialisations end
in different masks, and the pruning pass takes different masks to different 1-minimal
masks. With ``attribute(mode="per_image", starts=k)`` every image is fitted k times with
independent seeds (start 0 with the call's own seeds, so ``starts=1`` is the plain fit) and
keeps the candidate mask m that ranks first by, in this order of priority,

1. keeping the class:            argmax f(e(m)) == y;
2. keeping the image's confidence: lo_y(e(m)) >= lo_y(x);
3. the number of kept pixels |m| (fewer first);

with e(m) = m * x + (1 - m) * b and lo_y = log(p_y / (1 - p_y)) the log-odds of y (a
monotone function of p_y that does not round to a tie where float32 probabilities round to
1). Ties go to the earlier start. The candidates are compared after pruning when pruning is
on. Choosing among restarts by the quantity one cares about is ordinary multi-start
optimisation; the order above states what "the best mask" means here: a mask that keeps the
decision, then one that also keeps the confidence, then a smaller one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ._activation_matching_loss import log_odds
from ._activation_matching_training import derived_seed

__all__ = ["START_KEY", "start_seed", "best_start"]

#: key of the seed derivation of starts 1, 2, ... (start 0 uses the call's seed)
START_KEY = 17


def start_seed(base_seed: int, start: int) -> int:
    """The seed of start ``start`` of a call seeded with ``base_seed``: the call's own seed
    for start 0, a derived one for the others (``attribute(seed=start_seed(s, j))`` fits
    exactly start j of ``attribute(seed=s, starts=k)``)."""
    return base_seed if start == 0 else derived_seed(base_seed, START_KEY, start)


@torch.no_grad()
def best_start(
    logits_of: Callable[[Tensor], Tensor],
    inputs: Tensor,
    masks: Sequence[Tensor],
    target: Tensor,
    baseline: Tensor | float,
    reference_logits: Tensor,
) -> Tensor:
    """(N,) int64: per image, the index of the mask in ``masks`` (each (N, 1, H, W), binary)
    that ranks first by the order of the module docstring."""
    image_log_odds = log_odds(reference_logits, target)
    pixels = masks[0][0].numel()
    keys = []
    for mask in masks:
        logits = logits_of(mask * inputs + (1 - mask) * baseline)
        loses_class = (logits.argmax(1) != target).long()
        less_confident = (log_odds(logits, target) < image_log_odds).long()
        kept = mask.flatten(1).sum(1).round().long()
        # lexicographic (class, confidence, size) as one integer: size <= pixels
        keys.append((2 * loses_class + less_confident) * (pixels + 1) + kept)
    return torch.stack(keys).argmin(0)  # argmin returns the first of equal keys
