r"""Report section "What does the classifier think each class looks like?" (network inversion).

:func:`inversion_section` samples images of every class from a trained
:class:`~captum_ext.inversion.NetworkInversion` generator and shows them as a grid, with the
read-outs of the inversion papers per class: label consistency (does the classifier see the
requested class?), mean confidence, and within-class diversity.

Papers: Suhail & Sethi, "Network Inversion of Convolutional Neural Nets" (arXiv 2407.18002)
and "Network Inversion and Its Applications" (arXiv 2411.17777).

:func:`inversion_section` is :func:`compute_inversion` (the numbers, a :class:`InversionData`; no
matplotlib, no files) followed by :func:`render_inversion` (the figures and the page).

Example::

    >>> from captum_ext.bundled import BUNDLED_INVERSION_OPTIONS, load_bundled_inversion
    >>> from captum_ext.data import DIGIT_CLASSES, denormalize_digits
    >>> from captum_ext.inversion import NetworkInversion
    >>> from captum_ext.viz import Report, inversion_section
    >>> # your own model: NetworkInversion(model, ...).fit(1000), minutes on a CPU; skipped here
    >>> inversion = NetworkInversion(model, batch_size=64, **BUNDLED_INVERSION_OPTIONS)
    >>> history = inversion.fit(1000, progress=False)  # doctest: +SKIP
    >>> inversion = load_bundled_inversion(model)      # the bundled model's, already trained
    >>> report = Report("What does the digit model think a digit looks like?")
    >>> section = report.add_section(inversion_section(
    ...     inversion, "out", per_class=4, class_names=DIGIT_CLASSES,
    ...     denormalize=denormalize_digits))
    >>> report.write("out").name
    'index.html'
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._checks import _class_names
from ._figures import save_figure
from .report import Figure, Section, Table

if TYPE_CHECKING:
    from torch import Tensor

__all__ = [
    "InversionData",
    "compute_inversion",
    "inversion_section",
    "render_inversion",
]

#: width in the page (CSS pixels) of the sample grid
_GRID_WIDTH = 640

#: mean within-class feature cosine above which the samples of a class count as nearly
#: identical (a collapsed generator); the section then says so beside the grid
COLLAPSE_COSINE = 0.9
#: label consistency below which the section says the generator has not inverted the model
CONSISTENT_SHARE = 0.9

#: classes shown by default when the model has more (a seeded random sample of them)
DEFAULT_MAX_CLASSES = 20


def _chosen_classes(classes, max_classes, num_classes: int, seed: int) -> tuple[list[int], bool]:
    """The classes to invert and whether they are a random sample of all classes."""
    import torch

    if classes is not None:
        if isinstance(classes, str | bytes) or not hasattr(classes, "__iter__"):
            raise TypeError(f"`classes` must be a sequence of class indices, got {classes!r}.")
        chosen = []
        for c in classes:
            if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < num_classes:
                raise ValueError(f"`classes` must hold ints in 0..{num_classes - 1}, got {c!r}.")
            if c not in chosen:
                chosen.append(c)
        if not chosen:
            raise ValueError("`classes` is empty; give at least one class to invert.")
        return chosen, False
    if isinstance(max_classes, bool) or not isinstance(max_classes, int) or max_classes < 1:
        raise ValueError(f"`max_classes` must be a positive int, got {max_classes!r}.")
    if num_classes <= max_classes:
        return list(range(num_classes)), False
    order = torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed))
    return sorted(order[:max_classes].tolist()), True


def inversion_section(
    inversion: Any,
    out_dir: str | os.PathLike,
    *,
    per_class: int = 8,
    class_names: Sequence[str] | None = None,
    denormalize: Callable | None = None,
    seed: int = 0,
    classes: Sequence[int] | None = None,
    max_classes: int = DEFAULT_MAX_CLASSES,
    title: str = "What does the classifier think each class looks like? (network inversion)",
) -> Section:
    r"""The section "What does the classifier think each class looks like?".

    Draws ``per_class`` images of every class from the trained generator of ``inversion``
    (:meth:`~captum_ext.inversion.NetworkInversion.sample_classes`, seeded with ``seed``)
    and reports, per class k and over all classes,

    .. code-block:: text

        consistency_k = share of the images generated for k that f classifies as k
        confidence_k  = mean softmax f(x)[k] over those images
        diversity_k   = mean pairwise cosine of their penultimate features (lower = more diverse)

    (:func:`~captum_ext.inversion.label_consistency`, ``mean_confidence`` and
    ``within_class_diversity``). A consistent generator shows what the classifier has learnt
    to call each class; an inconsistent one (low consistency) has not inverted it yet. The
    grid is a PNG in ``out_dir/images/inversion/``.

    For a model with more than ``max_classes`` classes (e.g. 1000 ImageNet classes) only a
    random sample of ``max_classes`` classes is inverted and shown (drawn with ``seed``,
    shown in ascending order); the page says so. The mean diversity is printed beside the
    grid; above ``COLLAPSE_COSINE`` (0.9: the samples of a class are nearly identical in
    the classifier's feature space, a collapsed generator) the page adds a caveat, and names
    the classes above it.

    Args:
        inversion (NetworkInversion): a trained inversion of the classifier.
        out_dir (str or PathLike): the report folder.
        per_class (int, optional): images per class (the grid's columns). Default: 8.
        class_names (Sequence[str], optional): one name per class. None: the indices.
        denormalize (callable, optional): maps the classifier's inputs to [0, 1] for display,
            e.g. :func:`captum_ext.data.denormalize_digits`. Default: None (each grid scaled
            from its minimum to its maximum).
        seed (int, optional): seed of the latent codes and conditioning vectors, and of the
            sample of classes. Default: 0.
        classes (Sequence[int], optional): the classes to invert and show. Default: None
            (all classes, or a random sample of ``max_classes`` when there are more).
        max_classes (int, optional): most classes shown when ``classes`` is None.
            Default: 20
        title (str, optional): the section title.

    Returns:
        Section: a row with the grid and the table of the read-outs.

    Examples::

        >>> from captum_ext.bundled import load_bundled_inversion
        >>> from captum_ext.viz import inversion_section
        >>> inversion = load_bundled_inversion(model)     # a trained NetworkInversion
        >>> section = inversion_section(inversion, "out", per_class=4)
        >>> section.rows[0].table.rows[0][:2]
        ['all', '40']
    """
    data = compute_inversion(
        inversion,
        per_class=per_class,
        class_names=class_names,
        seed=seed,
        classes=classes,
        max_classes=max_classes,
    )
    return render_inversion(data, out_dir, denormalize=denormalize, title=title)


@dataclass(frozen=True)
class InversionData:
    """What :func:`compute_inversion` returns (numbers and samples; :func:`render_inversion`
    draws them).

    Attributes:
        images (Tensor): the generated images, ``per_class`` per class in ``classes`` (CPU).
        labels (Tensor): the class requested for each image (CPU).
        classes (list[int]): the classes inverted, in the order shown.
        sampled (bool): whether ``classes`` is a random sample of all the classes.
        num_classes (int): the classifier's number of classes.
        class_names (list[str]): one name per class of the classifier.
        per_class (int): images per class.
        seed (int): the seed of the samples (and of the sample of classes).
        consistency (float): label consistency over all the images.
        confidence (float): mean confidence over all the images.
        diversity (float): mean within-class diversity (feature cosine, 1 = identical).
        class_counts (dict[int, int]): class -> number of images.
        class_consistency (dict[int, float]): class -> its label consistency.
        class_confidence (dict[int, float]): class -> its mean confidence.
        class_diversity (dict[int, float]): class -> its diversity (NaN for one image).
        similarity_across (float): the same feature cosine over all pairs of images, whatever
            their class (near 1: the rows are nearly identical across classes too, and the
            classifier tells them apart by small differences; NaN for one class).
    """

    images: Tensor
    labels: Tensor
    classes: list[int]
    sampled: bool
    num_classes: int
    class_names: list[str]
    per_class: int
    seed: int
    consistency: float
    confidence: float
    diversity: float
    class_counts: dict[int, int]
    class_consistency: dict[int, float]
    class_confidence: dict[int, float]
    class_diversity: dict[int, float]
    similarity_across: float = float("nan")

    @property
    def collapsed(self) -> bool:
        """Whether the mean diversity is above ``COLLAPSE_COSINE`` (a collapsed
        generator)."""
        return self.diversity > COLLAPSE_COSINE


def compute_inversion(
    inversion: Any,
    *,
    per_class: int = 8,
    class_names: Sequence[str] | None = None,
    seed: int = 0,
    classes: Sequence[int] | None = None,
    max_classes: int = DEFAULT_MAX_CLASSES,
) -> InversionData:
    r"""The numbers of :func:`inversion_section`, without drawing: ``per_class`` samples of
    each chosen class from the generator of ``inversion`` (seeded with ``seed``) and their
    label consistency, mean confidence and within-class diversity, over all the images and
    per class (:func:`~captum_ext.inversion.label_consistency`,
    ``mean_confidence``, ``within_class_diversity``).

    Args: as :func:`inversion_section`.

    Returns:
        :class:`InversionData`.
    """
    import torch

    from captum_ext.inversion import NetworkInversion, evaluation

    if not isinstance(inversion, NetworkInversion):
        raise TypeError(f"`inversion` must be a NetworkInversion, got {type(inversion).__name__}.")
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 2:
        raise ValueError(f"`per_class` must be an int >= 2 (for the diversity), got {per_class!r}.")
    classifier = inversion.model
    num_classes = inversion.generator.num_classes
    class_names = _class_names(class_names, num_classes)
    chosen, sampled = _chosen_classes(classes, max_classes, num_classes, seed)
    if chosen == list(range(num_classes)):
        images, labels = inversion.sample_classes(per_class, generator=seed)
    else:
        device = next(inversion.generator.parameters()).device
        labels = torch.tensor(chosen, device=device).repeat_interleave(per_class)
        images = inversion.sample(labels, generator=seed)
    diversity = evaluation.within_class_diversity(classifier, images, labels)
    across = float("nan")
    if len(chosen) > 1:  # every image in one group: the cosine over all pairs
        across = evaluation.within_class_diversity(
            classifier, images, torch.zeros_like(labels)
        ).mean
    # per_class is indexed like diversity.classes (the distinct labels), not by class index
    class_diversity = {
        int(k): float(v)
        for k, v in zip(diversity.classes.tolist(), diversity.per_class.tolist(), strict=True)
    }
    counts, consistency, confidence = {}, {}, {}
    for k in chosen:
        member = labels == k
        counts[k] = int(member.sum())
        consistency[k] = float(
            evaluation.label_consistency(classifier, images[member], labels[member])
        )
        confidence[k] = float(
            evaluation.mean_confidence(classifier, images[member], labels[member])
        )
    return InversionData(
        images=images.detach().cpu(),
        labels=labels.detach().cpu(),
        classes=chosen,
        sampled=sampled,
        num_classes=num_classes,
        class_names=class_names,
        per_class=per_class,
        seed=seed,
        consistency=float(evaluation.label_consistency(classifier, images, labels)),
        confidence=float(evaluation.mean_confidence(classifier, images, labels)),
        diversity=float(diversity.mean),
        class_counts=counts,
        class_consistency=consistency,
        class_confidence=confidence,
        class_diversity=class_diversity,
        similarity_across=float(across),
    )


def render_inversion(
    data: InversionData,
    out_dir: str | os.PathLike,
    *,
    denormalize: Callable | None = None,
    title: str = "What does the classifier think each class looks like? (network inversion)",
) -> Section:
    """Draw :func:`compute_inversion`'s samples as a grid (``out_dir/images/inversion/``,
    ``denormalize`` maps them to [0, 1] for display) and return the Section with the table
    of the read-outs and the page's caveats."""
    from captum_ext.inversion.evaluation import sample_grid

    chosen, class_names, num_classes = data.classes, data.class_names, data.num_classes
    per_class, seed = data.per_class, data.seed
    folder = Path(out_dir) / "images" / "inversion"
    folder.mkdir(parents=True, exist_ok=True)
    grid = sample_grid(
        data.images,
        data.labels,
        per_class=per_class,
        classes=chosen,
        denormalize=denormalize,
        class_names=class_names,
    )
    grid_path = folder / "samples.png"
    save_figure(grid, grid_path, dpi=80)
    per_class_diversity = data.class_diversity
    table = Table(
        ["class", "images", "label consistency", "mean confidence", "diversity (cosine)"],
        caption="Read-outs per class (consistency and confidence: higher is better; "
        "diversity: lower is more diverse)",
    )
    table.add_row(
        [
            "all",
            str(data.images.shape[0]),
            f"{data.consistency:.1%}",
            f"{data.confidence:.3f}",
            f"{data.diversity:.3f}",
        ]
    )
    for k in chosen:
        table.add_row(
            [
                class_names[k],
                str(data.class_counts[k]),
                f"{data.class_consistency[k]:.1%}",
                f"{data.class_confidence[k]:.3f}",
                f"{per_class_diversity[k]:.3f}",
            ]
        )
    sampled = data.sampled
    which = (
        f" The model has {num_classes} classes; {len(chosen)} of them, drawn at random "
        f"(seed {seed}), are inverted and shown."
        if sampled
        else (
            f" {len(chosen)} of the model's {num_classes} classes are shown."
            if len(chosen) < num_classes
            else ""
        )
    )
    collapsed = [
        class_names[k]
        for k in chosen
        if per_class_diversity[k] > COLLAPSE_COSINE  # NaN (one image) is not
    ]
    caveat = ""
    consistent = data.consistency >= CONSISTENT_SHARE
    if not consistent:
        missed = [class_names[k] for k in chosen if data.class_consistency[k] < 0.5]
        caveat = (
            f" Caveat: the classifier assigns only {data.consistency:.1%} of the samples to the "
            "class they were generated for: the generator has not inverted the classifier"
            + (
                " for " + ", ".join(missed[:10]) + (", ..." if len(missed) > 10 else "")
                if missed
                else ""
            )
            + ", so those rows do not show what the model calls that class; train longer "
            "(more generator steps)."
        )
    if data.diversity > COLLAPSE_COSINE:
        accepted = " the classifier accepts" if consistent else ""
        caveat += (
            f" Caveat: the samples are nearly identical within classes (mean feature cosine "
            f"{data.diversity:.3f} > {COLLAPSE_COSINE}: the generator has collapsed to about "
            f"one image per class), so each row shows one image{accepted}, not the variety of "
            "what the classifier accepts; train longer or with a larger diversity weight."
        )
    elif collapsed:
        caveat += (
            f" Nearly identical samples (feature cosine > {COLLAPSE_COSINE}) in: "
            + ", ".join(collapsed[:10])
            + (", ..." if len(collapsed) > 10 else "")
            + "."
        )
    if data.similarity_across > COLLAPSE_COSINE:
        caveat += (
            " Caveat: the samples are nearly identical across classes too (mean feature "
            "cosine over all pairs of samples, whatever their class, "
            f"{data.similarity_across:.3f})"
            + (
                ": the classifier puts the rows in different classes for small differences, "
                "not for anything a person would see as the class."
                if consistent
                else "."
            )
        )
    section = Section(
        title,
        intro=(
            "A generator trained to invert the classifier: for every class, images that the "
            "frozen classifier assigns to that class, drawn from random latent codes and "
            "conditioning vectors. They show what the model has learnt to call each class, "
            "which can differ from what people would draw (shortcuts, backgrounds, "
            f"textures). {per_class} images per class; label consistency is the share the "
            f"classifier assigns to the requested class.{which} Within-class diversity is "
            "the mean cosine between the classifier's features of two samples of the same "
            f"class: 1 means identical, 0 unrelated.{caveat}"
        ),
    )
    section.add_row(
        "Generated images, one row per class",
        [
            Figure(
                f"Samples of the inverted classifier; within-class diversity (mean feature "
                f"cosine, 1 = identical): {data.diversity:.3f}"
                + (" — nearly identical samples" if data.diversity > COLLAPSE_COSINE else ""),
                grid_path,
                _GRID_WIDTH,
            )
        ],
        table=table,
    )
    return section
