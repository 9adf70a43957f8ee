"""Stage progress on the console: a bar with count, rate and time left on a terminal; on a plain stream
(CI logs) a line at most every few seconds and a last one with the total and the rate."""

import io

import pytest
from rich.console import Console

from orchestration.progress import StageProgress

pytestmark = pytest.mark.unit


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


def test_counts_show_documents_and_tokens_with_their_rate_and_move_a_bar_of_that_unit():
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=160)
    with StageProgress(console, "clean", "input files", total=4) as progress:
        progress.count({"documents": 0})
        progress.update(1, 4)
        progress.count({"documents": 25_000})
        progress.update(4, 4)
    lines = out.getvalue().splitlines()
    assert lines[0] == "  clean: 0/4 input files; 0 documents"
    assert lines[1].startswith("  clean: 4/4 input files; 25.0k documents (") and lines[1].endswith("/s)")
    assert "; 25.0k documents (" in lines[-1]

    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=160)
    with StageProgress(console, "tokenize", "documents", total=3000) as progress:
        progress.count({"documents": 1000, "tokens": 40_000})  # a rerun: these were done before
        progress.count({"documents": 3000, "tokens": 120_500})
    lines = out.getvalue().splitlines()
    assert lines[0] == "  tokenize: 1,000/3,000 documents; 40.0k tokens"  # nothing new yet: no rate
    assert lines[1].startswith("  tokenize: 3,000/3,000 documents; 120.5k tokens (")
    assert (
        lines[-1].startswith("  tokenize: 3,000 documents in ")
        and "documents/s; 120.5k tokens (" in lines[-1]
    )

    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=160)
    with StageProgress(console, "tokenize", "documents", total=3000) as progress:
        progress.count({"documents": 0, "tokens": 0})
        progress.count({"documents": 1500, "tokens": 60_000})
    assert "1500/3000" in out.getvalue() and "60.0k tokens" in out.getvalue()  # the bar's last frame


def test_a_note_rides_along_and_an_instance_name_is_text_not_markup():
    """Training's progress: steps, with the latest loss and throughput as a note; a source's stage
    (``clean[web]``) keeps its brackets (rich would take ``[web]`` for a style)."""
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=120)
    with StageProgress(console, "train[web]", "steps", total=40) as progress:
        progress.update(0, note="starting workers")
        progress.update(40, note="loss 5.9016, 2,048 tok/s")
    lines = out.getvalue().splitlines()
    assert lines[0] == "  train[web]: 0/40 steps; starting workers"
    assert "  train[web]: 40/40 steps; loss 5.9016, 2,048 tok/s" in lines
    assert lines[-1].startswith("  train[web]: 40 steps in ") and lines[-1].endswith(
        "; loss 5.9016, 2,048 tok/s"
    )
