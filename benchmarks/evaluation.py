"""ROAD imputation for completeness + soundness: ours batched vs the per-image scipy pipelines.

The soundness/completeness reference pipeline (soco, after ROAD) and Quantus' ``ROAD`` impute
each (image, step) separately: a Python-assembled sparse system (``lil_matrix``) solved by
scipy's ``spsolve``; the 96 soundness steps make that the dominant cost. Baselines, run in this
process on the same (image, removal mask) pairs:

- ``quantus``: ``quantus.functions.perturb_func.noisy_linear_imputation`` (noise 0), the
  function Quantus' ROAD metric calls per image and percentage (the ROAD authors' imputer);
- ``scipy_vectorised``: the same system assembled with vectorised numpy and ``spsolve`` per
  image (a stricter baseline than the pipelines themselves).

``captum_ext.metrics.road_imputation`` solves every image and step of a batch at once:
``auto`` (on the CPU: ``multigrid`` for images of at least 56 x 56 pixels; below, a whole-grid
Cholesky, ``block`` up to 40 px wide, ``nested`` above, for dense masks and compact holes,
``direct`` for the others), ``multigrid`` (multigrid-preconditioned CG, iterative: about 1e-7
from the exact solvers), ``direct`` (one sparse LU of the
block-diagonal system), ``nested`` (batched nested-dissection Cholesky on the whole pixel grid),
``nested_mixed`` (the same factorised in float32, float64 accuracy recovered by iterative
refinement; not used by ``auto``), ``block`` (batched block-tridiagonal Cholesky, 28 px only).

The masks are those of completeness (9 thresholds, by value) and soundness (96 area steps) for
random maps: i.i.d. uniform pixels (scattered masks; the default) or, with ``--maps smooth``,
blurred noise (compact holes, as upsampled CAMs give). The baselines run on an even spread of
``--baseline-systems`` of the pairs and are extrapolated to all of them; for 224 px ours runs
on ``--large-images`` of the 8 images and is extrapolated likewise. Prints the agreement (max
abs difference to Quantus' imputation) and the ratios as one JSON line: wall-clock
(``speedup_*``) and process CPU time (``cpu_speedup_*``, less sensitive to other jobs on a
shared machine).

Run: ``python benchmarks/evaluation.py`` (about 5-10 minutes on 2 shared CPU cores);
``--quick`` for a smaller set; ``--threads 2`` for two torch threads (the baselines stay
single-threaded, so one thread is the like-for-like comparison).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import scipy.sparse as sparse
import scipy.sparse.linalg as linalg
import torch

from captum_ext.metrics.remove_and_debias import (
    DEFAULT_COMPLETENESS_THRESHOLDS,
    DEFAULT_SOUNDNESS_RATIOS,
    road_imputation,
)

_OFFSETS = [(dr, dq) for dr in (-1, 0, 1) for dq in (-1, 0, 1) if (dr, dq) != (0, 0)]


def scipy_imputation(image: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """One image: the linear-imputation system assembled with numpy and solved by scipy."""
    c, h, w = image.shape
    unknown = np.flatnonzero(removed.ravel())
    index = -np.ones(h * w, dtype=np.int64)
    index[unknown] = np.arange(unknown.size)
    rows_r, cols_q = np.divmod(unknown, w)
    flat = image.reshape(c, -1)
    diagonal = np.zeros(unknown.size)
    b = np.zeros((unknown.size, c))
    rows, cols, values = [], [], []
    for dr, dq in _OFFSETS:
        weight = 1 / 6 if dr == 0 or dq == 0 else 1 / 12
        rr, qq = rows_r + dr, cols_q + dq
        inside = (rr >= 0) & (rr < h) & (qq >= 0) & (qq < w)
        neighbour = np.where(inside, rr * w + qq, 0)
        diagonal += weight * inside
        is_unknown = inside & (index[neighbour] >= 0)
        is_known = inside & ~is_unknown
        rows.append(np.flatnonzero(is_unknown))
        cols.append(index[neighbour[is_unknown]])
        values.append(np.full(int(is_unknown.sum()), -weight))
        b[is_known] += weight * flat[:, neighbour[is_known]].T
    rows.append(np.arange(unknown.size))
    cols.append(np.arange(unknown.size))
    values.append(diagonal)
    a = sparse.csr_matrix(
        (np.concatenate(values), (np.concatenate(rows), np.concatenate(cols))),
        shape=(unknown.size, unknown.size),
    )
    solution = linalg.spsolve(a, b).reshape(unknown.size, c)
    out = flat.copy()
    out[:, unknown] = solution.T
    return out.reshape(c, h, w)


def smooth_maps(noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """``(N, H, W)`` uniform noise blurred by a Gaussian of ``sigma`` pixels (reflected at the
    border) and min-max scaled per map: spatially coherent maps like upsampled CAMs."""
    radius = int(3 * sigma)
    taps = torch.exp(-(torch.arange(-radius, radius + 1.0) ** 2) / (2 * sigma**2))
    taps = (taps / taps.sum()).to(noise.dtype)
    blurred = torch.nn.functional.pad(noise[:, None], (radius,) * 4, mode="reflect")
    blurred = torch.nn.functional.conv2d(blurred, taps.view(1, 1, 1, -1))
    blurred = torch.nn.functional.conv2d(blurred, taps.view(1, 1, -1, 1)).flatten(1)
    low = blurred.min(dim=1, keepdim=True).values
    return (blurred - low) / (blurred.max(dim=1, keepdim=True).values - low)


def masks(n: int, size: int, seed: int, steps: str, kind: str = "random") -> torch.Tensor:
    """Removal masks of completeness (by value) and/or soundness (by area) for random maps:
    ``kind`` "random" (i.i.d. uniform pixels: scattered masks) or "smooth" (:func:`smooth_maps`
    with sigma = size / 28: compact holes)."""
    generator = torch.Generator().manual_seed(seed)
    maps = torch.rand(n, size * size, generator=generator)
    if kind == "smooth":
        maps = smooth_maps(maps.view(n, size, size), size / 28)
    out = []
    if steps in ("both", "completeness"):
        top = maps.max(dim=1, keepdim=True).values
        out += [maps > (1 - t) * top for t in DEFAULT_COMPLETENESS_THRESHOLDS]
    if steps in ("both", "soundness"):
        ranks = maps.argsort(dim=1).argsort(dim=1)
        out += [ranks < int(size * size * r) for r in DEFAULT_SOUNDNESS_RATIOS]
    return torch.stack(out, dim=1).view(n * len(out), size, size)


def quantus_imputation(image: np.ndarray, removed: np.ndarray) -> np.ndarray:
    from quantus.functions.perturb_func import noisy_linear_imputation

    return noisy_linear_imputation(
        arr=image, indices=np.flatnonzero(removed.ravel()), noise=0.0
    ).reshape(image.shape)


_CPU: dict[str, float] = {}  # process CPU seconds of the last timed call (the machine is shared)


def _timed(function, *args, **kwargs):
    start, cpu = time.perf_counter(), time.process_time()
    out = function(*args, **kwargs)
    _CPU["last"] = time.process_time() - cpu
    return out, time.perf_counter() - start


def run(
    n: int,
    channels: int,
    size: int,
    ours_images: int,
    baseline_systems: int,
    seed: int,
    kind: str = "random",
) -> dict:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(n, channels, size, size, generator=generator, dtype=torch.float64)
    removed = masks(n, size, seed + 1, "both", kind)
    repeats = removed.shape[0] // n
    stacked = images.repeat_interleave(repeats, dim=0)
    systems = stacked.shape[0]
    ours_rows = ours_images * repeats
    scale = systems / ours_rows
    result = {"images": n, "channels": channels, "size": size, "maps": kind, "systems": systems}
    solvers = ["auto", "direct", "nested", "nested_mixed", "multigrid"]
    solvers += ["block"] if size <= 64 else []
    ours = {}

    def impute(solver: str, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # nested_mixed: float32 factor + float64 refinement (not chosen by auto)
        return road_imputation(x, mask, noise=0.0, solver=solver)

    for solver in solvers:  # warm-up (first LAPACK / scipy calls)
        impute(solver, stacked[:2], removed[:2])
    for solver in solvers:
        ours[solver], seconds = _timed(impute, solver, stacked[:ours_rows], removed[:ours_rows])
        result[f"ours_{solver}_s"] = round(seconds * scale, 2)
        result[f"ours_{solver}_cpu_s"] = round(_CPU["last"] * scale, 2)
    count = min(baseline_systems, ours_rows)
    picked = np.linspace(0, ours_rows - 1, count).round().astype(int)
    result["baseline_systems_timed"] = int(count)
    reference, seconds = _timed(
        lambda: [quantus_imputation(stacked[i].numpy(), removed[i].numpy()) for i in picked]
    )
    result["quantus_s"] = round(seconds * systems / count, 2)
    result["quantus_cpu_s"] = round(_CPU["last"] * systems / count, 2)
    _, seconds = _timed(
        lambda: [scipy_imputation(stacked[i].numpy(), removed[i].numpy()) for i in picked]
    )
    result["scipy_vectorised_s"] = round(seconds * systems / count, 2)
    result["scipy_vectorised_cpu_s"] = round(_CPU["last"] * systems / count, 2)
    for solver in solvers:
        ours_s = result[f"ours_{solver}_s"]
        result[f"speedup_{solver}_vs_quantus"] = round(result["quantus_s"] / ours_s, 2)
        result[f"speedup_{solver}_vs_scipy_vectorised"] = round(
            result["scipy_vectorised_s"] / ours_s, 2
        )
        for baseline in ("quantus", "scipy_vectorised"):
            result[f"cpu_speedup_{solver}_vs_{baseline}"] = round(
                result[f"{baseline}_cpu_s"] / result[f"ours_{solver}_cpu_s"], 2
            )
        result[f"max_abs_difference_{solver}"] = max(
            float(np.abs(ours[solver][i].numpy() - r).max()) for i, r in zip(picked, reference)
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline-systems", type=int, default=420)
    parser.add_argument("--large-images", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--maps",
        choices=("random", "smooth"),
        default="random",
        help="attribution maps whose masks are imputed: i.i.d. uniform pixels (scattered"
        " masks) or blurred noise (compact holes, like upsampled CAMs)",
    )
    args = parser.parse_args()
    # the baselines are single-threaded: one torch thread compares like with like
    torch.set_num_threads(args.threads)
    if args.quick:
        cases = [run(8, 1, 28, 8, 105, args.seed, args.maps)]
    else:
        cases = [
            run(64, 1, 28, 64, args.baseline_systems, args.seed, args.maps),
            run(8, 3, 224, args.large_images, 21, args.seed, args.maps),
        ]
    print(
        json.dumps(
            {
                "benchmark": "road_imputation_completeness_soundness",
                "torch": torch.__version__,
                "torch_threads": torch.get_num_threads(),
                "seed": args.seed,
                "cases": cases,
            }
        )
    )


if __name__ == "__main__":
    main()
