r"""Report section "What does the classifier think each class looks like?" (network inversion).

:func:`inversion_section` samples images of every class from a trained
:class:`~captum_ext.inversion.NetworkInversion` generator and shows them as a grid, with the
read-outs of the inversion papers per class: label consistency (does the classifier see the
requested class?), mean confidence, and within-class diversity.

Papers: Suhail & Sethi, "Network Inversion of Convolutional Neural Nets" (arXiv 2407.18002)
and "Network Inversion and Its Applications" (arXiv 2411.17777).

Example::

    >>> from captum_ext.data import DIGIT_CLASSES, denormalize_digits, load_bundled_model
    >>> from captum_ext.inversion import NetworkInversion
    >>> from captum_ext.viz import Report, inversion_section
    >>> inversion = NetworkInversion(load_bundled_model(), batch_size=64)
    >>> inversion.fit(1000)
    >>> report = Report("What does the digit model think a digit looks like?")
    >>> report.add_section(inversion_section(inversion, "out", class_names=DIGIT_CLASSES,
    ...                                      denormalize=denormalize_digits))
    >>> report.write("out")
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ._checks import _class_names
from .report import Figure, Section, Table

__all__ = ["inversion_section"]

#: width in the page (CSS pixels) of the sample grid
_GRID_WIDTH = 640


def inversion_section(
    inversion: Any,
    out_dir: str | os.PathLike,
    *,
    per_class: int = 8,
    class_names: Sequence[str] | None = None,
    denormalize: Callable | None = None,
    seed: int = 0,
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

    (:func:`~captum_ext.inversion.evaluation.label_consistency`, ``mean_confidence`` and
    ``within_class_diversity``). A consistent generator shows what the classifier has learnt
    to call each class; an inconsistent one (low consistency) has not inverted it yet. The
    grid is a PNG in ``out_dir/images/inversion/``.

    Args:
        inversion (NetworkInversion): a trained inversion of the classifier.
        out_dir (str or PathLike): the report folder.
        per_class (int, optional): images per class (the grid's columns). Default: 8.
        class_names (Sequence[str], optional): one name per class. None: the indices.
        denormalize (callable, optional): maps the classifier's inputs to [0, 1] for display,
            e.g. :func:`captum_ext.data.denormalize_digits`. Default: None (each grid scaled
            from its minimum to its maximum).
        seed (int, optional): seed of the latent codes and conditioning vectors. Default: 0.
        title (str, optional): the section title.

    Returns:
        Section: a row with the grid and the table of the read-outs.

    Examples::

        >>> section = inversion_section(inversion, "out", per_class=4)
        >>> section.rows[0].table.rows[0][:2]
        ['all', '40']
    """
    from captum_ext.inversion import NetworkInversion
    from captum_ext.inversion.evaluation import (
        label_consistency,
        mean_confidence,
        sample_grid,
        within_class_diversity,
    )

    if not isinstance(inversion, NetworkInversion):
        raise TypeError(f"`inversion` must be a NetworkInversion, got {type(inversion).__name__}.")
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 2:
        raise ValueError(f"`per_class` must be an int >= 2 (for the diversity), got {per_class!r}.")
    classifier = inversion.classifier
    num_classes = inversion.generator.num_classes
    class_names = _class_names(class_names, num_classes)
    images, labels = inversion.sample_classes(per_class, generator=seed)
    folder = Path(out_dir) / "images" / "inversion"
    folder.mkdir(parents=True, exist_ok=True)
    grid = sample_grid(
        images.cpu(),
        labels.cpu(),
        per_class=per_class,
        denormalize=denormalize,
        class_names=class_names,
    )
    grid_path = folder / "samples.png"
    grid.savefig(grid_path, format="png", dpi=80)

    diversity = within_class_diversity(classifier, images, labels)
    table = Table(
        ["class", "images", "label consistency", "mean confidence", "diversity (cosine)"],
        caption="Read-outs per class (consistency and confidence: higher is better; "
        "diversity: lower is more diverse)",
    )
    table.add_row(
        [
            "all",
            str(images.shape[0]),
            f"{label_consistency(classifier, images, labels):.1%}",
            f"{mean_confidence(classifier, images, labels):.3f}",
            f"{diversity.mean:.3f}",
        ]
    )
    for k in range(num_classes):
        member = labels == k
        table.add_row(
            [
                class_names[k],
                str(int(member.sum())),
                f"{label_consistency(classifier, images[member], labels[member]):.1%}",
                f"{mean_confidence(classifier, images[member], labels[member]):.3f}",
                f"{float(diversity.per_class[k]):.3f}",
            ]
        )
    section = Section(
        title,
        intro=(
            "A generator trained to invert the classifier: for every class, images that the "
            "frozen classifier assigns to that class, drawn from random latent codes and "
            "conditioning vectors. They show what the model has learnt to call each class, "
            "which can differ from what people would draw (shortcuts, backgrounds, "
            f"textures). {per_class} images per class; label consistency is the share the "
            "classifier assigns to the requested class."
        ),
    )
    section.add_row(
        "Generated images, one row per class",
        [Figure("Samples of the inverted classifier", grid_path, _GRID_WIDTH)],
        table=table,
    )
    return section
