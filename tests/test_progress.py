"""Progress output: bars on a terminal, plain lines in CI and logs, nothing for --json."""

from __future__ import annotations

import io
import re

import pytest

from ppsehr.common.progress import Progress, progress_mode


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("json_output, stream, env, mode", [
    (True, Terminal(), {}, "quiet"),
    (False, Terminal(), {"TERM": "xterm"}, "tty"),
    (False, Terminal(), {"CI": "true"}, "plain"),
    (False, Terminal(), {"CI": "0"}, "tty"),
    (False, Terminal(), {"TERM": "dumb"}, "plain"),
    (False, io.StringIO(), {}, "plain"),
    (False, io.StringIO(), {"PPSEHR_PROGRESS": "tty"}, "tty"),
    (False, Terminal(), {"CI": "1", "PPSEHR_PROGRESS": "quiet"}, "quiet"),
    (True, Terminal(), {"PPSEHR_PROGRESS": "tty"}, "quiet"),
])
def test_mode(json_output, stream, env, mode):
    assert progress_mode(json_output, stream, env) == mode


def _steps(p: Progress) -> None:
    with p.task("site measurement", total=8) as t:
        for i in range(8):
            t.advance(note=f"site {i} answered")
    with p.task("model fitting"):
        pass
    p.log("release written to out/")


def test_plain_lines_never_redraw_and_say_when_steps_end():
    out = io.StringIO()
    with Progress(stream=out, env={"CI": "true"}) as p:
        _steps(p)
        with pytest.raises(RuntimeError):
            with p.task("exports", total=3) as t:
                t.advance()
                raise RuntimeError("disk full")
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = [re.sub(r"^\[\d\d:\d\d:\d\d\] ", "", x) for x in text.splitlines()]
    assert lines[0] == "site measurement: 0/8 ..."
    # one line per quarter, not per item
    assert lines[1:4] == ["site measurement: 2/8 (site 1 answered)", "site measurement: 4/8 (site 3 answered)",
                          "site measurement: 6/8 (site 5 answered)"]
    assert re.fullmatch(r"site measurement: done \(8/8, \d+\.\d s\) site 7 answered", lines[4])
    assert lines[5] == "model fitting ..." and re.fullmatch(r"model fitting: done \(\d+\.\d s\)", lines[6])
    assert lines[7] == "release written to out/"
    assert re.fullmatch(r"exports: FAILED \(1/3, \d+\.\d s\)", lines[-1])


def test_json_output_prints_nothing():
    out = Terminal()
    with Progress(json_output=True, stream=out) as p:
        _steps(p)
        p.event({"stage": "plan", "message": "round 1"})
    assert out.getvalue() == ""


def test_terminal_gets_bars_and_spinners():
    out = Terminal()
    with Progress(stream=out, env={}) as p:
        assert p.mode == "tty"
        _steps(p)
    text = out.getvalue()
    assert "\x1b[" in text and "━" in text  # ANSI-drawn bars
    assert "8/8" in text and "✓" in text and "release written to out/" in text


def test_release_events_become_steps():
    out = io.StringIO()
    with Progress(stream=out, mode="plain") as p:
        p.event({"stage": "plan", "message": "round 1: plan p1 with 27 marginals"})
        p.event({"stage": "llm", "message": "batch 1 of 3", "done": 1, "total": 3})
        assert p._stage[0] == "llm" and p._stage[1].completed == 1 and p._stage[1].total == 3
        p.event({"stage": "llm", "message": "batch 2 of 3", "done": 2, "total": 3})
        p.event({"stage": "done", "message": "release written to r/"})
        assert p._stage is None
    lines = [re.sub(r"^\[\d\d:\d\d:\d\d\] ", "", x) for x in out.getvalue().splitlines()]
    assert lines == ["round 1: plan p1 with 27 marginals", "batch 1 of 3", "batch 2 of 3", "release written to r/"]


def test_rich_markup_in_messages_is_printed_as_is():
    out = Terminal()
    with Progress(stream=out, mode="tty") as p:
        p.log("site [bold]x[/bold] refused")
    assert "site [bold]x[/bold] refused" in out.getvalue()
