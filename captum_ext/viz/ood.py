r"""Report section "Does the classifier know what it has not seen?" (TIE OOD detection).

:func:`ood_section` reads a fitted :class:`~captum_ext.inversion.TIE` detector: how often it
sends in-distribution and out-of-distribution images to its garbage class, the threshold-free
metrics (AUROC, AUPR-In, FPR at 95 % TPR) per OOD set, beside the plain classifier's
max-softmax and energy scores when it is given, the distributions of the scores, the garbage
pool it learnt to reject, and its training log.

Papers: Suhail, Sethi et al., "TIE: A Training-Inversion-Exclusion Framework" (arXiv
2512.00229) and "Network Inversion for Uncertainty-Aware Out-of-Distribution Detection"
(arXiv 2505.23448).

:func:`ood_section` is :func:`compute_ood` (the numbers, a :class:`OODData`; no
matplotlib, no files) followed by :func:`render_ood` (the figures and the page).

Example::

    >>> import copy
    >>> from captum_ext.bundled import BUNDLED_INVERSION_OPTIONS
    >>> from captum_ext.data import denormalize_digits
    >>> from captum_ext.inversion import TIE, TIEConfig
    >>> from captum_ext.viz import Report, ood_section
    >>> _ = torch.manual_seed(0)
    >>> # a tiny fit on the sample digits (a real one: the training set, default TIEConfig)
    >>> config = TIEConfig(generator_steps=2, generator_batch_size=8, batch_size=20)
    >>> tie = TIE(copy.deepcopy(model), config=config, **BUNDLED_INVERSION_OPTIONS)
    >>> log = tie.fit(images, labels, epochs=1, progress=False)
    >>> heldout = images                                   # use held-out digits in practice
    >>> letters = torch.rand(20, 1, 28, 28)                # stand-ins for real OOD sets
    >>> noise = torch.randn(20, 1, 28, 28)
    >>> report = Report("OOD")
    >>> section = report.add_section(ood_section(
    ...     tie, heldout, {"letters": letters, "noise": noise}, "out", plain_model=model,
    ...     denormalize=denormalize_digits))
    >>> report.write("out").name
    'index.html'
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from ._figures import legend_as_given, new_figure, save_figure
from .report import Figure, Section, Table, _model_device

__all__ = ["IN_DISTRIBUTION", "OODData", "compute_ood", "ood_section", "render_ood"]

_PLOT_WIDTH = 480

#: the key of the in-distribution images in :class:`OODData`'s dictionaries
IN_DISTRIBUTION = "in-distribution"


def _check_set(images: Any, argument: str) -> Tensor:
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[0] == 0:
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"`{argument}` must be a non-empty N x C x H x W tensor, got {got}.")
    return images


def _metric_cell(auroc: float, aupr: float, fpr: float) -> str:
    return f"{auroc:.3f} / {aupr:.3f} / {fpr:.3f}"


def _plot_histograms(scores: dict[str, Tensor], path: Path) -> Path:
    figure = new_figure(480, 360)
    ax = figure.subplots()
    bins = np.linspace(0.0, 1.0, 41)
    handles, names = [], []
    for name, values in scores.items():
        *_, patches = ax.hist(values.double().numpy(), bins=bins, histtype="step", linewidth=1.6)
        handles.append(patches[0])
        names.append(str(name))
    ax.set_xlabel("TIE in-distribution score (1 - OOD score)")
    ax.set_ylabel("images")
    ax.set_yscale("log")
    ax.set_title("Scores, in-distribution vs each OOD set")
    # every set under its own name, also one starting with "_", drawn as given
    legend_as_given(ax, handles, names, fontsize=8)
    save_figure(figure, path)
    return path


def _pool_figure(pool: Tensor, denormalize: Callable | None, count: int):
    """The newest pool images in a grid; grey images get a bar with their scale."""
    from matplotlib.figure import Figure as PlotFigure

    shown = pool[:count].detach().float().cpu()
    low, high = 0.0, 1.0
    if denormalize is not None:
        shown = denormalize(shown)
    else:
        low, high = float(shown.min()), float(shown.max())
        shown = (shown - low) / max(high - low, 1e-12)
    shown = shown.clamp(0, 1)
    grey = shown.shape[1] == 1
    columns = min(10, shown.shape[0])
    rows = math.ceil(shown.shape[0] / columns)
    figure = PlotFigure(
        figsize=(0.8 * columns + (0.9 if grey else 0.0), 0.8 * rows + (0.3 if grey else 0.0)),
        dpi=80,
        layout="constrained",
    )
    axes = np.atleast_1d(figure.subplots(rows, columns)).reshape(-1)
    for ax in axes:
        ax.axis("off")
    for ax, image in zip(axes, shown):
        if image.shape[0] == 1:
            ax.imshow(image[0].numpy(), cmap="gray", vmin=0, vmax=1)
        else:
            ax.imshow(image[:3].permute(1, 2, 0).numpy())
    if grey:
        from matplotlib import colormaps
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        bar = figure.colorbar(
            ScalarMappable(Normalize(low, high), colormaps["gray"]), ax=list(axes), shrink=0.9
        )
        bar.ax.tick_params(labelsize=7)
        bar.set_label(
            "pixel value" if denormalize is not None else "value (stretched min to max)",
            fontsize=7,
        )
    return figure


def _plot_pool(pool: Tensor, denormalize: Callable | None, count: int, path: Path) -> Path:
    figure = _pool_figure(pool, denormalize, count)
    save_figure(figure, path)
    return path


def ood_section(
    tie: Any,
    in_distribution: Tensor,
    ood_sets: Mapping[str, Tensor],
    out_dir: str | os.PathLike,
    *,
    plain_model: Callable | None = None,
    denormalize: Callable | None = None,
    kind: str = "max_in",
    pool_images: int = 30,
    title: str = "Does the classifier know what it has not seen? (TIE)",
) -> Section:
    r"""The section "Does the classifier know what it has not seen?" for a fitted TIE.

    Scores (higher = more in-distribution; ``kind`` selects TIE's score, see
    :meth:`~captum_ext.inversion.TIE.ood_score`):

    .. code-block:: text

        TIE          s(x) = 1 - ood_score(x)     (in float64: TIE.in_distribution_score)
        max-softmax  s(x) = max_c softmax(f(x))_c          (plain classifier f, if given)
        energy       s(x) = logsumexp_c f(x)_c             (plain classifier f, if given)

    and, per OOD set, ``AUROC / AUPR-In / FPR@95TPR`` of separating the in-distribution
    images (positive) from the set (:func:`~captum_ext.metrics.auroc`,
    :func:`~captum_ext.metrics.aupr`, :func:`~captum_ext.metrics.fpr_at_tpr`), and the share
    of images TIE assigns to its garbage class.

    Rows: a table of those metrics with a histogram of TIE's scores; a grid of the garbage
    pool (the noise seeds and the inverted samples TIE learnt to reject); and the training
    log (per epoch: accuracy, pool size, excluded fraction, mean UE). PNGs go to
    ``out_dir/images/ood/``.

    Args:
        tie (TIE): a fitted detector.
        in_distribution (Tensor): N x C x H x W in-distribution test images (normalised as
            the classifier expects).
        ood_sets (Mapping[str, Tensor]): name -> out-of-distribution images.
        out_dir (str or PathLike): the report folder.
        plain_model (Callable, optional): the n-class classifier without TIE, for the
            max-softmax and energy columns. Default: None (no baseline columns).
        denormalize (callable, optional): maps the classifier's inputs to [0, 1] for the pool
            grid, e.g. :func:`captum_ext.data.denormalize_digits`. Default: None (min-max).
        kind (str, optional): TIE's score: ``"max_in"``, ``"ue"`` or ``"garbage"``.
            Default: ``"max_in"``.
        pool_images (int, optional): images of the garbage pool shown (newest last).
            Default: 30.
        title (str, optional): the section title.

    Returns:
        Section: the rows described above.

    Examples::

        >>> import copy
        >>> from captum_ext.bundled import BUNDLED_INVERSION_OPTIONS
        >>> from captum_ext.inversion import TIE, TIEConfig
        >>> from captum_ext.viz import ood_section
        >>> _ = torch.manual_seed(0)
        >>> config = TIEConfig(generator_steps=2, generator_batch_size=8, batch_size=20)
        >>> tie = TIE(copy.deepcopy(model), config=config, **BUNDLED_INVERSION_OPTIONS)
        >>> log = tie.fit(images, labels, epochs=1, progress=False)   # a tiny fit
        >>> heldout, noise = images, torch.randn(20, 1, 28, 28)
        >>> section = ood_section(tie, heldout, {"noise": noise}, "out", plain_model=model)
        >>> section.rows[0].table.columns[:3]
        ['images', 'count', 'sent to garbage']
    """
    data = compute_ood(
        tie,
        in_distribution,
        ood_sets,
        plain_model=plain_model,
        kind=kind,
        pool_images=pool_images,
    )
    return render_ood(data, out_dir, denormalize=denormalize, title=title)


@dataclass(frozen=True)
class OODData:
    """What :func:`compute_ood` returns (numbers only; :func:`render_ood` draws them).

    Attributes:
        kind (str): TIE's score (see :meth:`~captum_ext.inversion.TIE.ood_score`).
        counts (dict[str, int]): ``"in-distribution"`` and each OOD set -> its number of
            images.
        garbage (dict[str, float]): the same keys -> share of images TIE sends to its
            garbage class.
        scores (dict[str, dict[str, Tensor]]): the same keys -> score name (``"TIE"``, and
            ``"max-softmax"``, ``"energy"`` with a plain model) -> per-image scores, higher =
            more in-distribution (float64, CPU).
        metrics (dict[str, dict[str, tuple[float, float, float]]]): OOD set -> score name ->
            (AUROC, AUPR-In, FPR@95TPR) against the in-distribution images.
        pool (Tensor or None): the newest ``pool_images`` images of the garbage pool (CPU),
            None when none is shown.
        pool_size (int): the number of images in the garbage pool.
        log (dict[str, list]): a copy of TIE's training log.
    """

    kind: str
    counts: dict[str, int]
    garbage: dict[str, float]
    scores: dict[str, dict[str, Tensor]]
    metrics: dict[str, dict[str, tuple[float, float, float]]]
    pool: Tensor | None
    pool_size: int
    log: dict[str, list]

    @property
    def score_names(self) -> list[str]:
        """``"TIE"`` then the plain classifier's baselines, in the table's order."""
        return list(self.scores[IN_DISTRIBUTION])


def compute_ood(
    tie: Any,
    in_distribution: Tensor,
    ood_sets: Mapping[str, Tensor],
    *,
    plain_model: Callable | None = None,
    kind: str = "max_in",
    pool_images: int = 30,
) -> OODData:
    r"""The numbers of :func:`ood_section`, without drawing: the scores of TIE (and of the
    plain classifier's max-softmax and energy, when ``plain_model`` is given) on the
    in-distribution images and on each OOD set, the metrics
    (:func:`~captum_ext.metrics.auroc`, :func:`~captum_ext.metrics.aupr`,
    :func:`~captum_ext.metrics.fpr_at_tpr`) of each score per OOD set, the share of each set
    sent to the garbage class, and the newest ``pool_images`` images of the garbage pool.

    Args: as :func:`ood_section`.

    Returns:
        :class:`OODData`.
    """
    from captum_ext.inversion import TIE
    from captum_ext.metrics import aupr, auroc, energy, fpr_at_tpr, softmax_confidence

    if not isinstance(tie, TIE):
        raise TypeError(f"`tie` must be a fitted TIE detector, got {type(tie).__name__}.")
    if tie.pool is None:
        raise ValueError("`tie` has not been fitted yet: call tie.fit(inputs, labels) first.")
    in_distribution = _check_set(in_distribution, "in_distribution")
    if not isinstance(ood_sets, Mapping) or not ood_sets:
        raise ValueError("`ood_sets` must be a non-empty mapping of name -> images.")
    sets = {str(k): _check_set(v, f"ood_sets[{k!r}]") for k, v in ood_sets.items()}
    if IN_DISTRIBUTION in sets:
        raise ValueError(
            f"`ood_sets` has a set named {IN_DISTRIBUTION!r}, the name of the in-distribution "
            "images in the table; rename it."
        )
    if isinstance(pool_images, bool) or not isinstance(pool_images, int) or pool_images < 0:
        raise ValueError(f"`pool_images` must be a non-negative int, got {pool_images!r}.")

    scorers: dict[str, Callable[[Tensor], Tensor]] = {
        # float64: in float32 1 - p_garbage is exactly 1 below 6e-8, and the ties move AUROC
        "TIE": lambda x: tie.in_distribution_score(x, kind=kind).detach().cpu().double()
    }
    if plain_model is not None:
        device = _model_device(plain_model, in_distribution)
        scorers["max-softmax"] = lambda x: (
            softmax_confidence(plain_model, x.to(device)).cpu().double()
        )
        scorers["energy"] = lambda x: energy(plain_model, x.to(device)).cpu().double()
    counts, garbage, scores, metrics = {}, {}, {}, {}
    for name, images in {IN_DISTRIBUTION: in_distribution, **sets}.items():
        counts[name] = int(images.shape[0])
        garbage[name] = float(tie.predict(images).is_garbage.cpu().double().mean())
        scores[name] = {score: fn(images) for score, fn in scorers.items()}
    for name in sets:
        metrics[name] = {
            score: (
                float(auroc(scores[IN_DISTRIBUTION][score], outside)),
                float(aupr(scores[IN_DISTRIBUTION][score], outside)),
                float(fpr_at_tpr(scores[IN_DISTRIBUTION][score], outside)),
            )
            for score, outside in scores[name].items()
        }
    pool = None
    if pool_images and tie.pool is not None and tie.pool.shape[0]:
        pool = tie.pool[-pool_images:].detach().cpu()
    return OODData(
        kind=kind,
        counts=counts,
        garbage=garbage,
        scores=scores,
        metrics=metrics,
        pool=pool,
        pool_size=int(tie.pool.shape[0]),
        log={key: list(values) for key, values in tie.log.items()},
    )


def render_ood(
    data: OODData,
    out_dir: str | os.PathLike,
    *,
    denormalize: Callable | None = None,
    title: str = "Does the classifier know what it has not seen? (TIE)",
) -> Section:
    """Draw :func:`compute_ood`'s numbers (the table, the histogram of TIE's scores, the
    garbage pool shown with ``denormalize``, the training log) into ``out_dir/images/ood/``
    and return the Section (rows as in :func:`ood_section`)."""
    folder = Path(out_dir) / "images" / "ood"
    folder.mkdir(parents=True, exist_ok=True)
    baselines = data.score_names[1:]
    columns = ["images", "count", "sent to garbage", "TIE"] + baselines
    table = Table(
        columns,
        caption="AUROC / AUPR-In / FPR@95TPR against the in-distribution images (higher, "
        "higher, lower are better); in-distribution is the positive class",
    )
    histogram = {}
    for name, count in data.counts.items():
        cells = [name, count, f"{data.garbage[name]:.1%}"]
        if name == IN_DISTRIBUTION:
            cells += ["-"] * (1 + len(baselines))
        else:
            cells += [_metric_cell(*data.metrics[name][score]) for score in data.score_names]
        table.add_row(cells)
        histogram[name] = data.scores[name]["TIE"]
    figures = [
        Figure(
            "TIE scores (log scale)",
            _plot_histograms(histogram, folder / "scores.png"),
            _PLOT_WIDTH,
        )
    ]
    section = Section(
        title,
        intro=(
            "TIE gives the classifier an extra 'garbage' class, seeded with noise images and "
            "filled, epoch after epoch, with the classifier's own uncertain inverted samples: "
            "a generator is trained to produce images of every class, and those the "
            "classifier is unsure about (UE above the threshold) join the garbage pool. The "
            "classifier thus learns to say 'none of these' without seeing any "
            "out-of-distribution data. Sent to garbage: the share of images TIE assigns to "
            "that class."
        ),
    )
    section.add_row("Detection", figures, table=table)
    if data.pool is not None:
        pool = data.pool
        path = _plot_pool(pool, denormalize, pool.shape[0], folder / "garbage_pool.png")
        section.add_row(
            f"The garbage pool ({data.pool_size} images; the newest {pool.shape[0]} shown)",
            [Figure("What TIE learnt to reject", path, _PLOT_WIDTH)],
        )
    log = data.log
    if log.get("epoch"):
        history = Table(
            ["epoch", "accuracy", "pool size", "excluded fraction", "mean UE"],
            caption="Training log (a last row without UE is the final training epoch)",
        )
        for i in range(len(log["epoch"])):
            ue = log["mean_ue"][i]
            history.add_row(
                [
                    f"{log['epoch'][i]:g}",
                    f"{log['accuracy'][i]:.3f}",
                    log["pool_size"][i],
                    f"{log['excluded_fraction'][i]:.3f}",
                    "-" if ue != ue else f"{ue:.3f}",
                ]
            )
        section.add_row("Training", table=history)
    return section
