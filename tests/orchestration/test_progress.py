"""Stage progress on the console: a bar with count, rate and time left on a terminal; on a plain stream
(CI logs) a line at most every few seconds and a last one with the total and the rate."""

import io

from rich.console import Console

from orchestration.progress import StageProgress


def test_a_plain_stream_gets_few_lines_and_a_total():
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=120)
    with StageProgress(console, "clean", "input files", total=400) as progress:
        for done in range(1, 401):
            progress.update(done, 400)
    lines = out.getvalue().splitlines()
    assert lines[0] == "  clean: 1/400 input files"  # the first, then one every 5 s at most
    assert "  clean: 400/400 input files" in lines
    assert lines[-1].startswith("  clean: 400 input files in ") and "input files/s" in lines[-1]
    assert len(lines) <= 4


def test_a_terminal_gets_a_bar_with_rate_and_phases():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    with StageProgress(console, "dedup", "tasks") as progress:
        progress.update(0, 3, phase="signatures")
        progress.update(3, 3, phase="signatures")
        progress.update(1, 2, phase="components")
        progress.update(2, 2)
    text = out.getvalue()
    assert "dedup: components" in text and "2/2" in text
    assert "dedup: 2 tasks in " in text.splitlines()[-1]
