"""The project's exceptions: one root, one subclass per stage.

Errors from other libraries are wrapped at the module edge with
``raise XError(...) from exc`` so the cause is kept. Only ``cli.py`` exits.
"""

from __future__ import annotations


class MonitorError(Exception):
    """Root of every error this package raises on purpose."""


class ConfigError(MonitorError):
    """The configuration is invalid.

    Attributes:
        problems: One ``"path: message"`` line per problem, in file order.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  {p}" for p in problems))


class SourceError(MonitorError):
    """A camera could not be opened or read."""


class DetectorError(MonitorError):
    """The model could not be loaded or run."""


class PublishError(MonitorError):
    """An event could not be stored or delivered."""
