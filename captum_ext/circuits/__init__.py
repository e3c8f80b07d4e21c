"""Channel-level circuit readout: which channels and connections a CNN uses for an input.

From "Minimalist Explanation Generation and Circuit Discovery" (Suhail, Anand, Sethi,
arXiv 2509.25686). :class:`CircuitReadout` turns each input into a ``networkx.DiGraph``;
:func:`compare` measures what two circuits share (for example of an image and of its
minimal mask), :func:`to_json` / :func:`from_json` save and load them, and :func:`draw`
plots one (needs the ``viz`` extra).
"""

from captum_ext.circuits.compare import CircuitComparison, compare, from_json, to_json
from captum_ext.circuits.connection import Connection
from captum_ext.circuits.draw import draw
from captum_ext.circuits.pathway import pathway_graphs
from captum_ext.circuits.readout import CircuitReadout

__all__ = [
    "CircuitComparison",
    "CircuitReadout",
    "Connection",
    "compare",
    "draw",
    "from_json",
    "pathway_graphs",
    "to_json",
]
