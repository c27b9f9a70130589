"""Command-line options: each declared once, read from its flag or from its
environment variable, and checked by one converter for both.

argparse alone checks ``choices`` only on the command line and never
converts the default of a ``store_true`` flag, so values taken from the
environment slipped past every check. Here an option's flag and its
variable go through the same converter, and a bad value from either is a
usage error: one line naming the flag or the variable and the value, exit 2.

The converters (``integer``, ``real``, ``one_of``, ``boolean``,
``address``, ``target``, ``nonempty``, ``existing_file``) raise
``argparse.ArgumentTypeError`` with a message that says what was expected.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from streamer.logs import FORMATS, LEVELS

Convert = Callable[[str], Any]

# Events per second a generated workload may be asked for: far above what a
# Puller here can emit, low enough that a typo is caught.
MAX_RATE = 1_000_000.0

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def integer(low: int | None = None, high: int | None = None) -> Convert:
    """An integer in ``[low, high]`` (either bound may be open)."""

    def convert(text: str) -> int:
        try:
            value = int(text.strip(), 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        _check_range(value, low, high)
        return value

    return convert


def real(low: float | None = None, high: float | None = None, *, above: bool = False) -> Convert:
    """A finite number in ``[low, high]``; ``above``: strictly greater than ``low``."""

    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, not {text!r}")
        if above and low is not None and value <= low:
            raise argparse.ArgumentTypeError(f"must be greater than {low:g}, not {value:g}")
        _check_range(value, low, high)
        return value

    return convert


def _check_range(value: float, low: float | None, high: float | None) -> None:
    if low is not None and value < low:
        raise argparse.ArgumentTypeError(f"must be at least {low:g}, not {value:g}")
    if high is not None and value > high:
        raise argparse.ArgumentTypeError(f"must be at most {high:g}, not {value:g}")


def one_of(*choices: str, fold: Callable[[str], str] | None = None) -> Convert:
    """One of ``choices``; ``fold`` (e.g. ``str.upper``) normalizes first."""

    def convert(text: str) -> str:
        value = fold(text) if fold else text
        if value not in choices:
            raise argparse.ArgumentTypeError(
                f"must be one of {', '.join(choices)}, not {text!r}"
            )
        return value

    convert.choices = choices  # type: ignore[attr-defined]
    return convert


def boolean(text: str) -> bool:
    """1/0, true/false, yes/no, on/off (any case); empty is false."""
    folded = text.strip().lower()
    if folded in _TRUE:
        return True
    if folded in _FALSE:
        return False
    raise argparse.ArgumentTypeError(
        f"must be one of 1, 0, true, false, yes, no, on, off, not {text!r}"
    )


def address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) as ``(host, port)``; port 0-65535."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"not HOST:PORT: {text!r}")
    if int(port) > 65535:
        raise argparse.ArgumentTypeError(f"port {port} is out of range (0-65535) in {text!r}")
    return host, int(port)


def target(text: str) -> str:
    """A server to connect to, ``HOST:PORT`` with a port 1-65535, as given."""
    if address(text)[1] == 0:
        raise argparse.ArgumentTypeError(f"port 0 cannot be connected to: {text!r}")
    return text


def etcd_url(text: str) -> tuple[str, ...]:
    """``etcd://HOST:PORT[,HOST:PORT...]`` as the endpoints ``HOST:PORT``,
    each with a port 1-65535, given once."""
    scheme, sep, rest = text.partition("://")
    if not sep or scheme != "etcd":
        raise argparse.ArgumentTypeError(f"not etcd://HOST:PORT[,HOST:PORT...]: {text!r}")
    endpoints = tuple(item.strip() for item in rest.split(","))
    for endpoint in endpoints:
        if not endpoint:
            raise argparse.ArgumentTypeError(f"an empty HOST:PORT in {text!r}")
        target(endpoint)
    if len(set(endpoints)) != len(endpoints):
        raise argparse.ArgumentTypeError(f"a HOST:PORT given twice in {text!r}")
    return endpoints


def key_name(text: str) -> str:
    """A name that can be part of a key: non-empty, without '/' or NUL."""
    if not text or "/" in text or "\0" in text:
        raise argparse.ArgumentTypeError(f"must be non-empty, without '/' or NUL: {text!r}")
    return text


def nonempty(text: str) -> str:
    """Any string but the empty one."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def names(text: str) -> tuple[str, ...]:
    """A comma-separated list of names, each non-empty and given once."""
    items = tuple(item.strip() for item in text.split(","))
    if any(not item for item in items):
        raise argparse.ArgumentTypeError(f"an empty name in {text!r}")
    if len(set(items)) != len(items):
        raise argparse.ArgumentTypeError(f"a name given twice in {text!r}")
    return items


def existing_file(text: str) -> Path:
    """A path that names a regular file (readable or not: opening says)."""
    path = Path(text)
    if not path.is_file():
        what = "a directory" if path.is_dir() else "no such file"
        raise argparse.ArgumentTypeError(f"{text}: {what}")
    return path


def join(host: str, port: int) -> str:
    """``(host, port)`` back as ``HOST:PORT`` (brackets for IPv6)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class _Option:
    dest: str
    flag: str
    variable: str
    convert: Convert
    default: Any
    required: bool


class Options:
    """The options of one command: flags on ``parser``, variables under
    ``env_prefix``. Call ``resolve`` on the parsed namespace to fill in every
    option not given as a flag, from its variable or its default."""

    def __init__(self, parser: argparse.ArgumentParser, env_prefix: str) -> None:
        self.parser = parser
        self.env_prefix = env_prefix
        self._options: list[_Option] = []

    def add(
        self,
        flag: str,
        convert: Convert = str,
        *,
        default: Any = None,
        help: str,
        metavar: str | None = None,
        switch: bool = False,
        required: bool = False,
        group: argparse._ActionsContainer | None = None,
    ) -> None:
        """Declare ``--flag``. ``default`` is the value used when neither the
        flag nor the variable is given (None: off). ``switch``: a flag without
        a value, true when given; its variable takes a boolean."""
        dest = flag.removeprefix("--").replace("-", "_")
        variable = f"{self.env_prefix}{dest.upper()}"
        shown = _shown(default, convert)
        notes = (
            ["required"] if required else [f"default: {shown}"] if shown is not None else []
        ) + [f"env {variable}"]
        text = f"{help} ({'; '.join(notes)})"
        container = group if group is not None else self.parser
        choices = getattr(convert, "choices", None)
        if switch:
            convert = boolean
            container.add_argument(flag, action="store_const", const=True, default=None,
                                   help=text)
        else:
            container.add_argument(
                flag, type=convert, default=None, help=text,
                metavar=metavar or ("{" + ",".join(choices) + "}" if choices else None),
            )
        self._options.append(_Option(dest, flag, variable, convert, default, required))

    def resolve(self, args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> None:
        """Fill every option the command line left unset: from its variable
        (checked by the same converter as the flag), else its default. A bad
        variable or a missing required option is a usage error."""
        env = os.environ if environ is None else environ
        for option in self._options:
            if getattr(args, option.dest) is not None:
                continue
            raw = env.get(option.variable)
            if raw is None:
                if option.required:
                    self.parser.error(f"{option.flag} is required (or {option.variable})")
                setattr(args, option.dest, option.default)
                continue
            try:
                value = option.convert(raw)
            except (argparse.ArgumentTypeError, ValueError) as exc:
                self.parser.error(f"{option.variable}: {exc}")
            setattr(args, option.dest, value)


def _shown(default: Any, convert: Convert) -> str | None:
    if default is None or default is False or default == ():
        return None
    if isinstance(default, tuple) and len(default) == 2 and convert is address:
        return join(*default)
    if isinstance(default, float):
        return f"{default:g}"
    return str(default)


def add_logging_options(opts: Options) -> None:
    """``--log-level`` and ``--log-format``, as every service command has them."""
    opts.add("--log-level", one_of(*LEVELS, fold=str.upper), default="INFO",
             help="log verbosity")
    opts.add("--log-format", one_of(*FORMATS, fold=str.lower), default="text",
             help="log lines on stderr: text, or json (one object per line)")
