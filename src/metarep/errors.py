"""The two errors of bad input, one per layer.

- :class:`ArgumentError`: raised by the maths (:mod:`metarep.core`) and the torch engine
  (:mod:`metarep.engine`) for an argument out of its range; ``argument`` names the function's
  own argument (``inner_lr``, ``X``), never a config key.
- :class:`ConfigError`: raised by the run layer and above for a bad config value, file or
  option; ``key`` is the dotted config key or CLI option at fault (``method.inner_lr``,
  ``--out``). The CLI prints it as one line and exits with code 2.

This module imports nothing of metarep, so every layer can use it.
"""

from __future__ import annotations


class ArgumentError(ValueError):
    """An argument of a library function is out of range; ``argument`` is its name."""

    def __init__(self, argument: str, message: str):
        super().__init__(f"{argument}: {message}")
        self.argument = argument
        self.message = message


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type or out of range.

    ``key`` is the dotted name of the offending field (e.g. ``"problem.k"``).
    """

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message
