"""graph_rewrite: activations that save their output, not their input, for backward.

>>> import graph_rewrite
>>> lean = graph_rewrite.optimize(model)                     # doctest: +SKIP
>>> print(lean.rewrite_report)                               # doctest: +SKIP
>>> print(graph_rewrite.verify(model, lean, x))              # doctest: +SKIP

The modules are named for what they do (``transform``, ``verification``) so that
``graph_rewrite.optimize`` and ``graph_rewrite.verify`` are the functions.
"""
from . import ops
from .printout import graph_diff
from .transform import RewrittenModule, optimize
from .verification import VerificationReport, verify
from .report import RewriteReport
from .rules import RULES, Consumer, Recomputable, Rule

__all__ = ["optimize", "verify", "graph_diff", "RewrittenModule", "RewriteReport", "VerificationReport", "RULES", "Rule", "Recomputable", "Consumer", "ops"]
__version__ = "0.1.0"
