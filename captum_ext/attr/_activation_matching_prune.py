"""Pruning pass of ActivationMatchingMask: drop the kept pixels a decision does not need.

Given the hard mask m of an image x (from the amortised net or a per-image fit), the class y
it keeps and the explanation e(m) = m * x + (1 - m) * b, a kept pixel i is *redundant* when
the mask without it, m - 1_i, still

    keeps the class:          argmax f(e(m - 1_i)) == y, and
    keeps the confidence:     lo_y(e(m - 1_i)) >= min(lo_y(x), lo_y(e(m_0))) + tol,

with lo_y = log(p_y / (1 - p_y)) the log-odds of y, m_0 the mask before pruning and tol =
1e-3 (0.1 % in odds), a margin so that the rounding of the logits cannot decide a drop: an
explanation at least as confident as the image stays so, and one that was less confident
does not lose more. The pass visits the kept pixels in increasing order of the mask
probability p (the pixels the mask net or fit was least sure of first) and drops each
redundant one at once; passes repeat until one drops nothing (or ``max_passes``), so the
result is 1-minimal: no single kept pixel of it is redundant. At least one pixel of a
non-empty mask is kept; an empty mask (a fit that failed) stays empty.

Every image of the batch is pruned at the same time: step j of a pass tries the j-th pixel
of each image in one forward pass (of the images that still have a j-th pixel), so a pass
costs max_i |m_i| forward passes whatever the batch size. The pruning optimises nothing: no
gradient is taken, and the activation-matching terms play no part in it (the activations
of e may match those of x less well after it; ``benchmarks/RESULTS.md`` reports by how
much on the bundled model).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ._activation_matching_loss import log_odds

__all__ = ["prune_mask"]

#: log-odds margin of the confidence condition (see the module docstring)
CONFIDENCE_TOLERANCE = 1e-3


@torch.no_grad()
def prune_mask(
    logits_of: Callable[[Tensor], Tensor],
    inputs: Tensor,
    mask: Tensor,
    order: Tensor,
    target: Tensor,
    baseline: Tensor,
    reference_logits: Tensor,
    max_passes: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The pruned masks and the number of pixels dropped per image.

    Args:
        logits_of: the classifier, (N, C, H, W) -> (N, classes) logits.
        inputs: the images x, (N, C, H, W).
        mask: their binary masks m_0, (N, 1, H, W).
        order: (N, 1, H, W) scores; the kept pixels are tried lowest first (ties: the
            earlier pixel in row-major order first).
        target: (N,) the class y kept.
        baseline: the masked-out value b, broadcastable to the images.
        reference_logits: f(x), (N, classes).
        max_passes: at most this many passes; None: until a pass drops nothing.
    """
    n = inputs.shape[0]
    rows = torch.arange(n, device=inputs.device)
    flat = mask.flatten(1).clone()

    def explained(masks: Tensor, which: Tensor = rows) -> Tensor:
        shaped = masks.view(-1, *mask.shape[1:])
        return shaped * inputs[which] + (1 - shaped) * baseline

    floor = (
        torch.minimum(
            log_odds(reference_logits, target), log_odds(logits_of(explained(flat)), target)
        )
        + CONFIDENCE_TOLERANCE
    )
    dropped = torch.zeros(n, dtype=torch.long, device=inputs.device)
    passes = 0
    while max_passes is None or passes < max_passes:
        passes += 1
        kept_scores = torch.where(flat > 0, order.flatten(1), torch.full_like(flat, torch.inf))
        visit = kept_scores.argsort(dim=1, stable=True)
        dropped_this_pass = 0
        for step in range(int(flat.sum(1).max())):
            pixel = visit[:, step]
            live = (flat[rows, pixel] > 0) & (flat.sum(1) > 1)
            if not bool(live.any()):
                continue
            tried = rows[live]
            trial = flat[tried].clone()
            trial[torch.arange(len(tried), device=trial.device), pixel[tried]] = 0
            logits = logits_of(explained(trial, tried))
            redundant = (logits.argmax(1) == target[tried]) & (
                log_odds(logits, target[tried]) >= floor[tried]
            )
            flat[tried[redundant], pixel[tried[redundant]]] = 0
            dropped[tried[redundant]] += 1
            dropped_this_pass += int(redundant.sum())
        if dropped_this_pass == 0:
            break
    return flat.view_as(mask), dropped
