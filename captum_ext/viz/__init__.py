"""Figures and the HTML report (needs the ``viz``/``report`` extras: matplotlib, pillow, jinja2,
tqdm; each is imported only when the function that needs it runs).

- :func:`overlay`, :func:`save_png`: a heat map over an image, as a uint8 RGB array / PNG.
- :class:`Report`, :class:`Section`, :class:`Row`, :class:`Figure`: a modular HTML report.
- :func:`contrastive_section`: the "Why P? / Why P, rather than Q? / What if not P?" section.
"""

from .overlay import overlay, save_png, to_uint8_rgb
from .report import Figure, Report, Row, Section, contrastive_section

__all__ = [
    "Figure",
    "Report",
    "Row",
    "Section",
    "contrastive_section",
    "overlay",
    "save_png",
    "to_uint8_rgb",
]
