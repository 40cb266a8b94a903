"""Command-line conventions shared by every `authz` subcommand.

- Every ``--long-flag`` of every subcommand can also be set by the environment variable
  ``AUTHZ_<FLAG_IN_UPPER_SNAKE_CASE>`` (``--grpc-addr`` -> ``AUTHZ_GRPC_ADDR``), the way
  Kubernetes users configure a container. A flag on the command line wins over its variable.
  The layer is generic: it reads the parser, so flags added later get their variable too.
  Values go through the flag's own parsing, so a bad value is refused the same way and the
  message names the variable. On/off flags take true/false (1/0, yes/no, on/off); repeatable
  flags take a comma-separated list (or one item per line, for items holding commas).
- A usage error (an unknown flag, a bad value, a bad address) is one line on stderr naming
  what is wrong, and exit status 2: ``UsageError`` carries it from wherever it is found.

docs/configuration.md lists every flag with its variable; tests/unit/test_cli_conventions.py
checks that list against the parser.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import NoReturn

from authz.example import EXIT_USAGE

ENV_PREFIX = "AUTHZ_"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class UsageError(Exception):
    """A mistake in how authz was invoked or configured: one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error`` raises UsageError instead of printing usage.

    Subparsers are created with the class of their parent, so every subcommand gets this too.
    """

    # Where each flag filled from the environment came from, so an error can name it.
    env_sources: dict[str, str] = {}

    def error(self, message: str) -> NoReturn:
        m = re.match(r"argument (--[\w-]+)", message)
        if m and m.group(1) in Parser.env_sources:
            message += f" (from the environment variable {Parser.env_sources[m.group(1)]})"
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


# --- value types shared by flags ---------------------------------------------------------


def address(text: str) -> str:
    """HOST:PORT with a port from 0 to 65535 (0: any free port); IPv6 hosts in brackets."""
    host, sep, port = text.rpartition(":")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    ok = bool(sep) and port.isascii() and port.isdigit() and 0 <= int(port) <= 65535 and _valid_host(bare)
    if not ok:
        raise argparse.ArgumentTypeError(
            f"expected HOST:PORT with a port from 0 to 65535 (e.g. 127.0.0.1:9191), not {text!r}")
    return text


def _valid_host(host: str) -> bool:
    if host == "":
        return True  # ":9191": all interfaces
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    return re.fullmatch(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*",
                        host) is not None and not host.replace(".", "").isdigit()


def _number(text: str, kind: type[int] | type[float], least: float, what: str) -> float:
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or value < least or value != value:  # value != value: NaN
        raise argparse.ArgumentTypeError(f"expected {what}, not {text!r}")
    return value


def positive_int(text: str) -> int:
    return int(_number(text, int, 1, "a whole number from 1"))


def non_negative_int(text: str) -> int:
    return int(_number(text, int, 0, "a whole number from 0"))


def non_negative_float(text: str) -> float:
    value = _number(text, float, 0, "a number of seconds from 0")
    if value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds from 0, not {text!r}")
    return value


def fraction(text: str) -> float:
    value = _number(text, float, 0, "a number from 0 to 1")
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, not {text!r}")
    return value


def positive_float(text: str) -> float:
    value = _number(text, float, 0, "a number of seconds above 0")
    if value == 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0, not {text!r}")
    return value


def log_level(text: str) -> str:
    if text.lower() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(LOG_LEVELS)}, not {text!r}")
    return text.upper()


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    """--log-level and --log-format (authz/logging_setup.py)."""
    parser.add_argument("--log-level", type=log_level, default="INFO", metavar="LEVEL",
                        help=f"one of {', '.join(LOG_LEVELS)} (default info)")
    parser.add_argument("--log-format", choices=["text", "json"], default="text",
                        help="text (default), or json: one JSON object per line with time, level, "
                             "logger, message and fields such as revision and decision_id")


# --- the environment ---------------------------------------------------------------------


def env_name(flag: str) -> str:
    """``--grpc-addr`` -> ``AUTHZ_GRPC_ADDR``."""
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


@dataclass(frozen=True, slots=True)
class Option:
    """One flag of one subcommand, as the environment layer and the documentation see it."""

    command: str  # "serve"
    flag: str  # "--grpc-addr"
    env: str  # "AUTHZ_GRPC_ADDR"
    kind: str  # "value", "switch" (true/false) or "list" (comma-separated)
    default: str  # as shown in the documentation
    help: str
    action: argparse.Action


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # noqa: SLF001 - argparse has no public accessor
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            return dict(action.choices)
    return {}


def options(parser: argparse.ArgumentParser) -> Iterator[Option]:
    """Every flag of every subcommand that the environment can set, in declaration order."""
    for command, sub in subcommands(parser).items():
        for action in sub._actions:  # noqa: SLF001
            longs = [s for s in action.option_strings if s.startswith("--")]
            if not longs or action.help == argparse.SUPPRESS:
                continue
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):  # noqa: SLF001
                continue
            if action.nargs == 0:
                kind = "switch"
            elif isinstance(action, argparse._AppendAction) or action.nargs in ("+", "*"):  # noqa: SLF001
                kind = "list"
            else:
                kind = "value"
            yield Option(command, longs[0], env_name(longs[0]), kind, _shown_default(action),
                         " ".join((action.help or "").split()), action)


def _shown_default(action: argparse.Action) -> str:
    if action.nargs == 0:
        return "false" if not action.default else "true"
    if action.default is None or action.default == []:
        return ""
    return str(action.default)


def with_environment(parser: argparse.ArgumentParser, argv: list[str],
                     environ: Mapping[str, str]) -> list[str]:
    """``argv`` with the flags of its subcommand that are absent but set in ``environ`` added.

    They are added as ``--flag=value`` right after the subcommand's name, so the parser
    checks them as it checks typed flags. A flag present on the command line, in any
    spelling argparse accepts (``--flag``, ``--flag=v`` or an unambiguous prefix), wins.
    """
    Parser.env_sources = {}
    subs = subcommands(parser)
    index = next((i for i, a in enumerate(argv) if a in subs), None)
    if index is None:
        return argv
    command, rest = argv[index], argv[index + 1:]
    sub = subs[command]
    given = _given_flags(sub, rest)
    added: list[str] = []
    for opt in options(parser):
        if opt.command != command or opt.env not in environ or opt.action.dest in given:
            continue
        value = environ[opt.env]
        if opt.kind == "switch":
            word = value.strip().lower()
            if word not in _TRUE | _FALSE:
                raise UsageError(f"authz {command}: {opt.env}: expected true or false, not {value!r}")
            if word in _TRUE:
                added.append(opt.flag)
        elif opt.kind == "list":
            # One item per line when the value has lines (items that hold commas), else commas.
            parts = value.splitlines() if "\n" in value.strip() else value.split(",")
            added += [f"{opt.flag}={item.strip()}" for item in parts if item.strip()]
        else:
            added.append(f"{opt.flag}={value}")
        Parser.env_sources[opt.flag] = opt.env
    return [*argv[: index + 1], *added, *rest]


def _given_flags(parser: argparse.ArgumentParser, args: list[str]) -> set[str]:
    """The dests of the flags present in ``args`` (up to a ``--``)."""
    known = parser._option_string_actions  # noqa: SLF001
    given: set[str] = set()
    for token in args:
        if token == "--":
            break
        if not token.startswith("--"):
            continue
        name = token.split("=", 1)[0]
        if name in known:
            given.add(known[name].dest)
            continue
        matches = {a.dest for s, a in known.items() if s.startswith(name)}
        if len(matches) == 1:
            given |= matches
    return given


# --- reporting ---------------------------------------------------------------------------


def report(error: UsageError) -> int:
    """Print a usage error as its one line; the exit status of every usage error."""
    print(" ".join(str(error).split()), file=sys.stderr)  # one line, whatever the message held
    return EXIT_USAGE


# --- documentation -----------------------------------------------------------------------

TABLE_BEGIN = "<!-- BEGIN: generated from the parser by scripts/configuration-doc -->"
TABLE_END = "<!-- END: generated -->"


def markdown_tables(parser: argparse.ArgumentParser) -> str:
    """One table per subcommand: flag, variable, default and meaning (docs/configuration.md)."""
    out: list[str] = []
    by_command: dict[str, list[Option]] = {}
    for opt in options(parser):
        by_command.setdefault(opt.command, []).append(opt)
    for command, opts in by_command.items():
        out += [f"### authz {command}", "", "| Flag | Environment variable | Default | Meaning |",
                "|---|---|---|---|"]
        for o in opts:
            flag = o.flag if o.kind == "switch" else f"{o.flag} {_metavar(o.action)}"
            kind = {"switch": " (true/false)", "list": " (list)"}.get(o.kind, "")
            default = f"`{o.default}`" if o.default else ""
            meaning = o.help.replace("|", "\\|")
            out.append(f"| `{flag}` | `{o.env}`{kind} | {default} | {meaning} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def _metavar(action: argparse.Action) -> str:
    if isinstance(action.metavar, str):
        return action.metavar
    if action.choices is not None:
        return "|".join(str(c) for c in action.choices).replace("|", "\\|")
    return action.dest.upper()
