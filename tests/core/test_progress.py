"""Progress shown where a person reads it: plain lines with the time left when stderr is
not a terminal (log files, notebooks), a rich bar on a terminal; fed by the checkpoint
loop of ``cvcore.runs``."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest

from cvcore import progress


class Clock:
    def __init__(self, times):
        self.times = iter(times)

    def __call__(self):
        return next(self.times)


def test_plain_lines_time_left_is_the_rate_so_far():
    out = io.StringIO()
    # listener made at t=0; reports at 3, 4, 15, 16, 40 s
    lines = progress.PlainLines(out, interval=10.0, clock=Clock([0.0, 3.0, 4.0, 15.0, 16.0, 40.0]))
    for done in (1, 2, 5, 6, 8):
        lines("checkpoints", done, 8)
    assert out.getvalue().splitlines() == [
        # 3 s and 4 s: under the 10 s quiet start, nothing yet
        "checkpoints: 5/8 (62%), 15.0 s elapsed, about 9.0 s left",   # 3 s each, 3 to go
        "checkpoints: 8/8 (100%), 40.0 s elapsed, done",              # 6/8: under 10 s
    ]


def test_work_shorter_than_the_interval_says_nothing():
    """A command that ends (or fails) within the interval leaves stderr to its one line."""
    out = io.StringIO()
    lines = progress.PlainLines(out, interval=10.0, clock=Clock([0.0, 1.0, 2.0, 9.5]))
    lines("checkpoints", 1, 3)
    lines("checkpoints", 2, 3)
    lines("checkpoints", 3, 3)
    assert out.getvalue() == ""


def test_unknown_total_and_a_stage_that_starts_again():
    out = io.StringIO()
    lines = progress.PlainLines(out, interval=0.0, clock=Clock([0.0, 2.0, 5.0, 6.0, 9.0]))
    lines("products", 3, None)
    lines("blocks", 1, 1)
    lines("blocks", 1, 2)   # a new run of the stage, timed from the previous report (5 s)
    lines("blocks", 2, 2)
    assert out.getvalue().splitlines() == [
        "products: 3, 2.0 s elapsed",
        "blocks: 1/1 (100%), 3.0 s elapsed, done",  # timed from the report before (2 s)
        "blocks: 1/2 (50%), 1.0 s elapsed, about 1.0 s left",
        "blocks: 2/2 (100%), 4.0 s elapsed, done",
    ]


def test_durations():
    assert [progress.duration(s) for s in (0.04, 59.9, 60, 3599, 3600 * 25)] == [
        "0.0 s", "59.9 s", "1 min 0 s", "59 min 59 s", "25 h 0 min"]


def test_checkpoint_loop_in_a_log_file(tmp_path):
    torch = pytest.importorskip("torch")
    from cvcore.protocols import LoadOptions
    from cvcore.runs import ProbeSpec, measure_checkpoints
    from cvcore.validate import make_request

    for i in range(3):
        torch.manual_seed(i)
        torch.save(torch.nn.Linear(4, 2), tmp_path / f"epoch_{i}.pt")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(5, 4)).astype("float32"))
    log = io.StringIO()  # not a TTY, like a log file or a notebook's stderr
    assert not progress.is_terminal(log)
    with progress.shown(log, interval=0.0):
        rows = list(measure_checkpoints(sorted(tmp_path.glob("epoch_*.pt")),
                                        probe=ProbeSpec(str(tmp_path / "x.npy")),
                                        request=make_request(), options=LoadOptions()))
    assert len(rows) == 3 and all(r.error is None for r in rows)
    got = [ln for ln in log.getvalue().splitlines() if ln.startswith("checkpoints")]
    assert [re.match(r"checkpoints: (\d/3)", ln).group(1) for ln in got] == ["1/3", "2/3", "3/3"]
    assert "left" in got[0] and got[-1].endswith("done")
    assert not progress.active()  # the listener is gone after the block


def test_terminal_gets_a_rich_bar():
    out = io.StringIO()
    with progress.shown(out, terminal=True):
        assert progress.active()
        progress.advance("checkpoints", 1, 2)
        progress.advance("checkpoints", 2, 2)
    assert not progress.active()
