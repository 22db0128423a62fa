"""The one configuration error of the bundle: every problem at once, each naming its key.

Every validation (the cache's TOML, the frontends' model and policy, the sidecar's flags and
config file) collects *all* of its problems before raising, and each :class:`Problem` names the
key, flag or option it is about (``upstreams[1].url``, ``zstd.level``, ``--max-body``), so a user
fixes a configuration in one pass. A problem never carries a secret's value.

Keys are data, not text to re-parse: to report a nested model's problems under its own key use
:meth:`Problem.under`, to rename a key for the command line :meth:`Problem.renamed`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["ConfigError", "Problem", "raise_if"]


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a configuration: ``key`` names the option, ``message`` says what."""

    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"

    def under(self, prefix: str) -> Problem:
        """The same problem inside ``prefix`` (``upstreams[0]`` + ``url`` → ``upstreams[0].url``)."""
        return Problem(f"{prefix}.{self.key}" if self.key else prefix, self.message)

    def renamed(self, key: str) -> Problem:
        return Problem(key, self.message)


class ConfigError(ValueError):
    """A configuration that cannot be used; ``problems`` lists every reason (at least one)."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems: tuple[Problem, ...] = tuple(problems)
        if not self.problems:
            raise ValueError("ConfigError needs at least one problem")
        if not all(isinstance(p, Problem) for p in self.problems):
            raise TypeError("ConfigError takes Problem(key, message) objects")
        super().__init__(*self.problems)

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(p.key for p in self.problems)

    def __str__(self) -> str:
        if len(self.problems) == 1:
            return f"invalid configuration: {self.problems[0]}"
        lines = "\n".join(f"  - {p}" for p in self.problems)
        return f"invalid configuration ({len(self.problems)} problems):\n{lines}"


def raise_if(problems: Iterable[Problem]) -> None:
    """Raise a :class:`ConfigError` when ``problems`` is not empty."""
    collected = tuple(problems)
    if collected:
        raise ConfigError(collected)
