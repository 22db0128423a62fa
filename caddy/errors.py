"""The one error type of the caddy package: a configuration problem, reported all at once.

Every validation in the package collects *all* of its problems before raising, and each problem
names the key (or flag) it is about, e.g. ``upstreams[1].url: scheme 'ftp' is not http or https``.
"""

from __future__ import annotations

from collections.abc import Iterable


class ConfigError(ValueError):
    """A frontend model or policy that cannot be rendered; ``problems`` lists every reason."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems: tuple[str, ...] = tuple(problems)
        if not self.problems:
            raise ValueError("ConfigError needs at least one problem")
        super().__init__("; ".join(self.problems))

    def __str__(self) -> str:
        if len(self.problems) == 1:
            return f"invalid configuration: {self.problems[0]}"
        lines = "\n".join(f"  - {p}" for p in self.problems)
        return f"invalid configuration ({len(self.problems)} problems):\n{lines}"


def raise_if(problems: list[str]) -> None:
    """Raise a ConfigError when ``problems`` is not empty."""
    if problems:
        raise ConfigError(problems)
