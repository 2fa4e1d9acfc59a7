"""sottovoce edge runtime: the lean core that runs on the board.

This package must never import ``host`` or ``export`` (nor torch). Its contracts
(``edge.bundle``, ``edge.protocol``, ``edge.audio``) are what the other parts import.
"""

__version__ = "0.1.0"
