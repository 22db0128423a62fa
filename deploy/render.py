"""The shipped systemd units, read and rewritten: prefix, specifiers, ExecStart, Environment.

The unit files in deploy/systemd/ name their programs under /usr/bin. Installs elsewhere (a venv,
/usr/local/bin, /opt/harmonia/bin) render them with another prefix:

    python -m deploy.render --prefix /opt/harmonia/bin --dest /etc/systemd/system

The same reader gives the validation test the exact command line and environment of a unit, so the
test runs what systemd would run instead of a copy of it. Only the subset of systemd's syntax that
our units use is understood (sections, `Key=value`, `\\` continuations, comments, quoting in
ExecStart/Environment, the `%` specifiers); anything else is refused rather than guessed.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

UNIT_DIR = Path(__file__).resolve().parent / "systemd"
SHIPPED_PREFIX = "/usr/bin"
PROGRAMS = ("harmonia-cache", "harmonia-healthcheck", "harmonia-sidecar", "harmonia-caddy")
UNIT_SUFFIXES = (".service", ".socket", ".timer")


class UnitError(ValueError):
    """A unit file, or a value in it, that this reader does not understand."""


Sections = dict[str, list[tuple[str, str]]]


def parse_unit(text: str) -> Sections:
    """Sections of a unit file, each a list of (key, value) in file order (keys may repeat)."""
    sections: Sections = {}
    current: list[tuple[str, str]] | None = None
    logical: list[str] = []
    lines = text.splitlines()
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not logical and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            logical.append(line[:-1])
            continue
        line = " ".join([*logical, line]) if logical else line
        logical = []
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, sep, value = line.partition("=")
        if not sep or current is None:
            raise UnitError(f"line {number}: expected [Section] or Key=value, got {raw!r}")
        current.append((key.strip(), value.strip()))
    if logical:
        raise UnitError("file ends inside a continued line")
    return sections


def values(sections: Sections, section: str, key: str) -> list[str]:
    """All values of a list-valued key; an empty assignment resets the list, as in systemd."""
    out: list[str] = []
    for k, v in sections.get(section, []):
        if k == key:
            out = [] if v == "" else [*out, v]
    return out


def value(sections: Sections, section: str, key: str) -> str | None:
    """The last value of a single-valued key, or None."""
    found = [v for k, v in sections.get(section, []) if k == key]
    return found[-1] if found else None


_SPECIFIER = re.compile(r"%(.)", re.DOTALL)


def expand_specifiers(text: str, specifiers: Mapping[str, str]) -> str:
    """Replace `%x` by `specifiers["x"]` and `%%` by `%`; an unknown specifier is an error."""

    def sub(m: re.Match[str]) -> str:
        c = m.group(1)
        if c == "%":
            return "%"
        if c not in specifiers:
            raise UnitError(f"specifier %{c} in {text!r} has no value here")
        return specifiers[c]

    if text.endswith("%") and not text.endswith("%%"):
        raise UnitError(f"{text!r} ends in a lone %")
    return _SPECIFIER.sub(sub, text)


def split_command(command: str) -> list[str]:
    """ExecStart= words: whitespace-separated, with shell-like quotes; `-@:+!` prefixes dropped."""
    try:
        words = shlex.split(command, posix=True)
    except ValueError as exc:
        raise UnitError(f"cannot split {command!r}: {exc}") from None
    if not words:
        raise UnitError("empty command")
    words[0] = words[0].lstrip("-@:+!")
    if not words[0].startswith("/"):
        raise UnitError(f"{words[0]!r}: the program must be an absolute path")
    return words


def parse_environment(assignments: Sequence[str]) -> dict[str, str]:
    """Environment= values (each may hold several quoted `VAR=value` words) as one mapping."""
    env: dict[str, str] = {}
    for assignment in assignments:
        for word in shlex.split(assignment, posix=True):
            name, sep, val = word.partition("=")
            if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise UnitError(f"Environment: {word!r} is not VAR=value")
            env[name] = val
    return env


@dataclass(frozen=True, slots=True)
class ServiceCommand:
    """What systemd would execute for a service: its argv and the variables the unit sets."""

    argv: list[str]
    environment: dict[str, str]


def service_command(unit_text: str, specifiers: Mapping[str, str]) -> ServiceCommand:
    """The single ExecStart= of a service with its Environment=, specifiers expanded."""
    sections = parse_unit(unit_text)
    starts = values(sections, "Service", "ExecStart")
    if len(starts) != 1:
        raise UnitError(f"expected one ExecStart=, found {len(starts)}")
    argv = [expand_specifiers(w, specifiers) for w in split_command(starts[0])]
    env = {
        k: expand_specifiers(v, specifiers)
        for k, v in parse_environment(values(sections, "Service", "Environment")).items()
    }
    return ServiceCommand(argv, env)


def with_prefix(unit_text: str, prefix: str) -> str:
    """The unit with our programs under `prefix` instead of /usr/bin (only in Exec*= lines)."""
    prefix = prefix.rstrip("/")
    if not prefix.startswith("/"):
        raise UnitError(f"prefix {prefix!r} must be an absolute path")
    if any(c.isspace() or c in "%\\\"'" for c in prefix):
        raise UnitError(f"prefix {prefix!r} must not contain spaces, quotes, % or backslashes")
    names = "|".join(re.escape(p) for p in PROGRAMS)
    pattern = re.compile(rf"^(Exec\w+=[-@:+!]*){re.escape(SHIPPED_PREFIX)}/({names})(?=\s|$)", re.M)
    return pattern.sub(lambda m: f"{m.group(1)}{prefix}/{m.group(2)}", unit_text)


def shipped_units() -> list[Path]:
    return sorted(p for p in UNIT_DIR.iterdir() if p.suffix in UNIT_SUFFIXES)


def render_units(dest: Path, prefix: str) -> list[Path]:
    """Write every shipped unit into `dest` with programs under `prefix`; return the files."""
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for src in shipped_units():
        out = dest / src.name
        out.write_text(with_prefix(src.read_text(), prefix))
        written.append(out)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.render",
        description="Write the harmonia systemd units with the programs under another prefix.",
    )
    parser.add_argument("--prefix", required=True, help="directory holding harmonia-cache etc.")
    parser.add_argument("--dest", required=True, type=Path, help="where to write the units")
    args = parser.parse_args(argv)
    try:
        for path in render_units(args.dest, args.prefix):
            print(path)
    except (UnitError, OSError) as exc:
        print(f"deploy.render: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
