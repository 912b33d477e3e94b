"""graph_rewrite: activations that save their output, not their input, for backward.

>>> import graph_rewrite
>>> lean = graph_rewrite.optimize(model)         # doctest: +SKIP
>>> print(lean.rewrite_report)                   # doctest: +SKIP
"""
from . import ops
from .optimize import RewrittenModule, optimize
from .report import RewriteReport
from .rules import RULES, Rule

__all__ = ["optimize", "RewrittenModule", "RewriteReport", "RULES", "Rule", "ops"]
__version__ = "0.1.0"
