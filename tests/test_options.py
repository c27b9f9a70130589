"""streamer.options: the converters shared by flags and environment
variables, and ``Options.resolve``."""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import pytest

from streamer.options import (
    ArgumentParser,
    Options,
    address,
    boolean,
    existing_file,
    integer,
    join,
    names,
    nonempty,
    one_of,
    real,
    target,
)


@pytest.mark.parametrize(("value", "parsed"), [
    ("127.0.0.1:9100", ("127.0.0.1", 9100)),
    ("localhost:0", ("localhost", 0)),
    ("[::1]:9100", ("::1", 9100)),
    ("0.0.0.0:65535", ("0.0.0.0", 65535)),
])
def test_address(value: str, parsed: tuple[str, int]) -> None:
    assert address(value) == parsed
    assert join(*parsed) == value


@pytest.mark.parametrize(("value", "message"), [
    ("9100", "not HOST:PORT: '9100'"),
    (":9100", "not HOST:PORT"),
    ("host:", "not HOST:PORT"),
    ("host:port", "not HOST:PORT"),
    ("", "not HOST:PORT"),
    ("host:-1", "not HOST:PORT"),
    ("host:70000", "port 70000 is out of range (0-65535) in 'host:70000'"),
])
def test_address_refuses(value: str, message: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=re.escape(message)):
        address(value)


def test_target_needs_a_real_port() -> None:
    assert target("puller:50051") == "puller:50051"
    with pytest.raises(argparse.ArgumentTypeError, match="port 0 cannot be connected to"):
        target("puller:0")


@pytest.mark.parametrize(("convert", "text", "message"), [
    (integer(1), "0", "must be at least 1, not 0"),
    (integer(1, 64), "65", "must be at most 64, not 65"),
    (integer(), "1.5", "not an integer: '1.5'"),
    (real(0, above=True), "0", "must be greater than 0, not 0"),
    (real(0), "-1", "must be at least 0, not -1"),
    (real(0), "nan", "must be a finite number, not 'nan'"),
    (real(0), "inf", "must be a finite number, not 'inf'"),
    (real(0), "soon", "not a number: 'soon'"),
    (one_of("plain", "syntrix"), "xml", "must be one of plain, syntrix, not 'xml'"),
    (boolean, "maybe", "must be one of 1, 0, true, false, yes, no, on, off, not 'maybe'"),
    (nonempty, "", "must not be empty"),
    (names, "messages,,users", "an empty name in 'messages,,users'"),
    (names, "messages,users,messages", "a name given twice in 'messages,users,messages'"),
])
def test_converters_refuse_with_the_reason(
    convert: argparse._ActionType, text: str, message: str
) -> None:
    with pytest.raises(argparse.ArgumentTypeError) as caught:
        convert(text)
    assert str(caught.value) == message


def test_converters_accept() -> None:
    assert integer(0)("0") == 0
    assert real(0, above=True)("0.5") == 0.5
    assert math.isclose(real()("-1e3"), -1000.0)
    assert one_of("DEBUG", "INFO", fold=str.upper)("debug") == "DEBUG"
    assert [boolean(v) for v in ("1", "TRUE", "yes", "On", "0", "false", "No", "off", "")] == [
        True, True, True, True, False, False, False, False, False]
    assert names("messages, users") == ("messages", "users")


def test_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_text("x")
    assert existing_file(str(path)) == path
    with pytest.raises(argparse.ArgumentTypeError, match="no such file"):
        existing_file(str(path) + "-missing")
    with pytest.raises(argparse.ArgumentTypeError, match="a directory"):
        existing_file(str(path.parent))


def _options() -> tuple[ArgumentParser, Options]:
    parser = ArgumentParser(prog="t")
    opts = Options(parser, "T_")
    opts.add("--ttl", real(0, above=True), default=90.0, help="ttl")
    opts.add("--layout", one_of("plain", "syntrix"), default="plain", help="layout")
    opts.add("--stamp", switch=True, help="stamp")
    opts.add("--target", target, required=True, help="target")
    return parser, opts


def test_resolve_takes_flag_then_variable_then_default() -> None:
    parser, opts = _options()
    args = parser.parse_args(["--ttl", "5"])
    opts.resolve(args, {"T_TTL": "7", "T_STAMP": "yes", "T_TARGET": "h:1"})
    assert (args.ttl, args.layout, args.stamp, args.target) == (5.0, "plain", True, "h:1")
    args = parser.parse_args(["--stamp"])
    opts.resolve(args, {"T_TTL": "7", "T_STAMP": "no", "T_TARGET": "h:1"})
    assert (args.ttl, args.stamp) == (7.0, True)


@pytest.mark.parametrize(("environ", "message"), [
    ({"T_TARGET": "h:1", "T_TTL": "nan"}, "t: error: T_TTL: must be a finite number, not 'nan'"),
    ({"T_TARGET": "h:1", "T_LAYOUT": "xml"}, "T_LAYOUT: must be one of plain, syntrix"),
    ({"T_TARGET": "h:1", "T_STAMP": "nope"}, "T_STAMP: must be one of 1, 0, true"),
    ({}, "t: error: --target is required (or T_TARGET)"),
])
def test_resolve_refuses_bad_variables_in_one_line(
    environ: dict[str, str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    parser, opts = _options()
    args = parser.parse_args([])
    with pytest.raises(SystemExit) as caught:
        opts.resolve(args, environ)
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_help_names_each_variable_and_default() -> None:
    parser, _ = _options()
    text = " ".join(parser.format_help().split())
    assert "(default: 90; env T_TTL)" in text
    assert "(required; env T_TARGET)" in text
    assert "(env T_STAMP)" in text
