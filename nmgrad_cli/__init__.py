"""nmgrad: N:M sparsity for neural gradients (Chmiel et al., ICLR 2023).

Library API (no CLI imports here)::

    from nmgrad_cli import prune, marginals, METHODS
    g_hat = prune(dy, "mvue", "2:4", dim=-1)
"""

from .errors import NmgradError
from .methods import METHODS, get_method, method_names, register
from .patterns import Pattern, parse_pattern
from .prune import Marginals, marginals, prune

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "Marginals",
    "NmgradError",
    "Pattern",
    "__version__",
    "get_method",
    "marginals",
    "method_names",
    "parse_pattern",
    "prune",
    "register",
]
