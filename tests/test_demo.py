"""``streamer demo`` as a user runs it: a small end-to-end run that verifies,
its help, bad options, and Ctrl-C leaving no process behind."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from streamer.cli import main
from streamer.puller.log import ReplayLog
from streamer.tools.demo import (
    OWNER_FILE,
    Gateway,
    Run,
    build_parser,
    latency_series,
    remove_stale_work_dirs,
    summary,
    verify,
)

SMALL = ["--subscriptions", "2000", "--gateways", "2", "--rate", "500", "--duration", "3"]


def demo(*args: str) -> list[str]:
    return [sys.executable, "-m", "streamer", "demo", *args]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("STREAMER_")}


def test_small_run_verifies(tmp_path: Path) -> None:
    plot = tmp_path / "latency.png"
    done = subprocess.run(
        demo(*SMALL, "--work-dir", str(tmp_path / "work"), "--plot", str(plot)),
        capture_output=True, text=True, timeout=120, env=_env(),
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "registered 2,000 subscriptions on 2 gateways" in out
    assert re.search(r"^verification\s+\| OK: [\d,]+ events x 2,000 subscriptions", out, re.M)
    events = int(re.search(r"^events\s+\| ([\d,]+)", out, re.M)[1].replace(",", ""))  # type: ignore[index]
    deliveries = int(
        re.search(r"^deliveries\s+\| ([\d,]+)", out, re.M)[1].replace(",", "")  # type: ignore[index]
    )
    assert events > 1000 and deliveries > 0
    assert re.search(r"latency p50 / p99 / max\s+\| \d+ / \d+ / \d+ ms", out)
    # The work dir keeps what was verified: the Puller's log and the records.
    assert (tmp_path / "work" / "puller-log" / "LOG_ID").is_file()
    assert (tmp_path / "work" / "gw-1.deliveries").stat().st_size > 0
    _verification_catches_a_lost_delivery(tmp_path / "work")
    pytest.importorskip("matplotlib")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _verification_catches_a_lost_delivery(work: Path) -> None:
    """The check is not vacuous: drop one recorded delivery, swap two others."""
    log = ReplayLog(work / "puller-log")
    last = log.last_position
    log.close()
    marker = json.loads((work / "streamer-state" / "progress.json").read_text())["marker"]
    processed = int(marker.rsplit(":", 1)[1])
    gateways = [Gateway(k, None, work / f"gw-{k}.deliveries") for k in range(2)]  # type: ignore[arg-type]
    ok, report, _ = verify(work / "puller-log", last, processed, gateways, 2000, 2, 1)
    assert ok, report
    records = gateways[1].out.read_text().splitlines(keepends=True)
    gateways[1].out.write_text("".join(records[1:]))
    ok, report, _ = verify(work / "puller-log", last, processed, gateways, 2000, 2, 1)
    assert not ok and "subscription(s) differ" in report
    # Two deliveries to one subscription, out of order.
    first = {}
    for i, line in enumerate(records):
        sid = line.split()[2].split(",")[0]
        if sid in first:
            j = first[sid]
            records[i], records[j] = records[j], records[i]
            break
        first[sid] = i
    else:
        raise AssertionError("no subscription received two deliveries")
    gateways[1].out.write_text("".join(records))
    ok, report, _ = verify(work / "puller-log", last, processed, gateways, 2000, 2, 1)
    assert not ok and "subscription(s) differ" in report and "first difference at #" in report


def test_help_documents_every_option() -> None:
    done = subprocess.run(demo("--help"), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    flags = [f for a in build_parser()._actions for f in a.option_strings if f.startswith("--")]
    assert {"--subscriptions", "--gateways", "--rate", "--duration", "--plot"} <= set(flags)
    for flag in flags:
        assert flag in done.stdout
    assert "STREAMER_DEMO_" in done.stdout
    # The gateways' entry point is internal: not a `streamer` subcommand.
    top = subprocess.run(
        [sys.executable, "-m", "streamer", "--help"], capture_output=True, text=True, timeout=60
    )
    commands = re.findall(r"^  (\w+) ", top.stdout, re.M)
    assert commands == ["serve", "puller", "demo", "bench"]


def test_bad_option_exits_2() -> None:
    done = subprocess.run(demo("--no-such-option"), capture_output=True, text=True,
                          timeout=60, env=_env())
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr == (
        "streamer demo: error: unrecognized arguments: --no-such-option "
        "(see streamer demo --help)\n")


@pytest.mark.parametrize(("args", "named"), [
    (["--gateways", "0"], "--gateways"), (["--rate", "-1"], "--rate"),
    (["--duration", "0"], "--duration"), (["--subscriptions", "x"], "--subscriptions"),
    (["--subscriptions", "0"], "--subscriptions"),
])
def test_bad_values_are_usage_errors(
    args: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Checked before anything starts, so in-process.
    with pytest.raises(SystemExit) as exited:
        main(["demo", *args])
    assert exited.value.code == 2
    assert named in capsys.readouterr().err


def test_bad_value_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("STREAMER_DEMO_GATEWAYS", "-3")
    with pytest.raises(SystemExit) as exited:
        main(["demo"])
    assert exited.value.code == 2
    assert "STREAMER_DEMO_GATEWAYS: must be at least 1, not -3" in capsys.readouterr().err


def test_ctrl_c_stops_everything(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        demo(*SMALL[:6], "--duration", "60", "--work-dir", str(tmp_path / "work")),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
    )
    try:
        assert proc.stdout is not None
        lines = []
        deadline = time.monotonic() + 60
        # Wait until the Puller runs: the Streamer, two gateways and the Puller.
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if line.startswith("Puller pid") or not line:
                break
        assert lines[-1].startswith("Puller pid"), "".join(lines)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 4
        time.sleep(1.5)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, "".join(lines) + rest
    assert "summary (partial: interrupted)" in rest
    assert "interrupted while running" in rest
    assert not re.search(r"^events\s+\| 0$", rest, re.M)  # the partial figures
    # Its rate is over the seconds the live rows cover, not the stopping after.
    rows = [int(m.replace(",", "")) for m in re.findall(r"^ *\d+s \| +([\d,]+) \|", rest, re.M)]
    found = re.search(r"^events/s\s+\| ([\d,]+) over ([\d.]+) s$", rest, re.M)
    assert rows and found, rest
    rate, seconds = int(found[1].replace(",", "")), float(found[2])
    assert seconds < len(rows) + 1, rest
    assert abs(rate * seconds - sum(rows)) <= 0.1 * sum(rows), rest
    _, alive = psutil.wait_procs(children, timeout=5)
    assert not alive, [p.pid for p in alive]


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux-only")
def test_killed_demo_leaves_no_process(tmp_path: Path) -> None:
    """Even SIGKILL, which no cleanup code survives: the children get SIGTERM
    from the kernel when the demo dies, and stop."""
    proc = subprocess.Popen(
        demo(*SMALL[:6], "--duration", "60", "--work-dir", str(tmp_path / "work")),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        line = ""
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if line.startswith("Puller pid") or not line:
                break
        assert line.startswith("Puller pid")
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 4
    finally:
        proc.kill()
        proc.wait()
    _, alive = psutil.wait_procs(children, timeout=20)
    assert not alive, [p.pid for p in alive]


def partial_run(**fields: object) -> Run:
    run = Run(argparse.Namespace(rate=2000.0), Path("unused"), interactive=False)
    for name, value in fields.items():
        setattr(run, name, value)
    return run


def test_partial_summary_rates_are_over_the_time_events_flowed() -> None:
    # Counted at the 10th second of a run interrupted 15 s after it began:
    # stopping the processes took the rest, and no event flowed meanwhile.
    run = partial_run(run_start=time.monotonic() - 15, flow_seconds=10.0, events=20_000,
                      deliveries=70_000)
    text = summary(run, interrupted=True)
    assert re.search(r"^events/s\s+\| 2,000 over 10\.0 s$", text, re.M), text
    assert re.search(r"^deliveries/s\s+\| 7,000$", text, re.M), text
    before = summary(partial_run(run_start=time.monotonic()), interrupted=True)
    assert re.search(r"^events/s\s+\| n/a$", before, re.M), before  # no count yet


def test_the_latency_plot_lines_up_with_the_live_table() -> None:
    run = partial_run(run_start=100.0)
    # Gateway reports arriving in the run's first second are the row the
    # live table prints at t = 1 s, and so on.
    run.latency_in({"5": 10}, now=100.5)
    run.latency_in({"7": 98, "40": 2}, now=101.2)
    assert latency_series(run) == [(1, 5.0, 5.0), (2, 7.0, 40.0)]
    assert [run.row_latencies(t) for t in (1, 2)] == [{5: 10}, {7: 98, 40: 2}]


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait(30)
    return proc.pid


def test_only_work_dirs_of_dead_demos_are_removed(tmp_path: Path) -> None:
    dead = dead_pid()

    def work_dir(name: str, owner: str | None) -> Path:
        path = tmp_path / name
        path.mkdir()
        (path / "streamer.log").write_text("kept until removed\n")
        if owner is not None:
            (path / OWNER_FILE).write_text(owner)
        return path

    abandoned = work_dir("streamer-demo-abandoned", f"{dead}\n")
    kept = [
        work_dir("streamer-demo-running", f"{os.getpid()}\n"),
        work_dir("streamer-demo-new", None),  # being created, or an older demo's
        work_dir("streamer-demo-garbled", "twelve\n"),
        work_dir("streamer-demo-group", "0\n"),
        work_dir("other-abandoned", f"{dead}\n"),
    ]
    plain_file = tmp_path / "streamer-demo-file"
    plain_file.write_text(f"{dead}\n")
    link = tmp_path / "streamer-demo-link"
    link.symlink_to(work_dir("elsewhere", f"{dead}\n"))
    assert remove_stale_work_dirs(tmp_path) == [abandoned]
    assert not abandoned.exists()
    assert all((path / "streamer.log").is_file() for path in kept)
    assert plain_file.is_file() and link.is_symlink() and (link / "streamer.log").is_file()
    assert remove_stale_work_dirs(tmp_path / "missing") == []


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user needs root")
def test_work_dirs_of_other_users_are_left_alone(tmp_path: Path) -> None:
    theirs = tmp_path / "streamer-demo-theirs"
    theirs.mkdir()
    (theirs / OWNER_FILE).write_text(f"{dead_pid()}\n")
    for path in (theirs, theirs / OWNER_FILE):
        os.chown(path, 65534, 65534)
    assert remove_stale_work_dirs(tmp_path) == []
    assert theirs.is_dir()


def lines_until(proc: subprocess.Popen[str], prefix: str) -> list[str]:
    """The demo's output up to its first line starting with ``prefix``."""
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    seen = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        seen.append(line)
        if line.startswith(prefix) or not line:
            break
    assert seen[-1].startswith(prefix), "".join(seen)
    return seen


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux-only")
def test_the_next_demo_removes_the_work_dir_of_a_killed_one() -> None:
    killed = subprocess.Popen(demo(*SMALL), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=_env())
    work: Path | None = None
    try:
        line = lines_until(killed, "streamer demo: work dir ")[-1]
        work = Path(line.removeprefix("streamer demo: work dir ").split(";")[0])
        children = psutil.Process(killed.pid).children(recursive=True)
        killed.kill()
        killed.wait(30)
        _, alive = psutil.wait_procs(children, timeout=20)
        assert not alive, [p.pid for p in alive]
        # SIGKILL skips every cleanup: the directory stays, naming its owner.
        assert (work / OWNER_FILE).read_text() == f"{killed.pid}\n"
        following = subprocess.Popen(demo(*SMALL), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=_env())
        try:
            start = lines_until(following, "streamer demo: work dir ")
            assert (f"streamer demo: removed {work}, left behind by a demo that was killed\n"
                    in start), start
            following.send_signal(signal.SIGINT)
            following.communicate(timeout=60)
        finally:
            if following.poll() is None:
                following.kill()
                following.wait()
        assert following.returncode == 130
        assert not work.exists()
    finally:
        if killed.poll() is None:
            killed.kill()
            killed.wait()
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
