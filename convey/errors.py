"""Every error convey raises on purpose derives from ``ConveyError``; the CLI catches it and prints its message
(never a traceback). Each layer defines the children it needs next to its code (``ConfigError`` in config.py,
``RulesError`` in the rules module, ...) and derives them from ``ConveyError``.
"""


class ConveyError(Exception):
    """An expected failure: bad input, a missing kernel feature, a command that failed. ``str()`` says what and,
    where it can, what to do."""


class StartupError(ConveyError):
    """The balancer cannot start; the message says why and what to do."""
