"""``cv report`` and ``cv plot`` on a store an integration wrote: shared by its tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cvcore.cli.app import make_app
from typer.testing import CliRunner

from cvcore.record import RecordStore


def report_and_plot(db: Path, out: Path) -> list[dict[str, Any]]:
    """Both commands succeed; each run's report starts and ends on the store's values."""
    runner = CliRunner()
    done = runner.invoke(make_app(), ["report", str(db), "--json"])
    assert done.exit_code == 0, done.output
    reports = json.loads(done.stdout)
    with RecordStore(db, create=False) as store:
        runs = store.runs()
        assert len(reports) == len(runs)
        for report, run in zip(reports, runs):
            records = store.records(run.id)
            assert report["steps"] == [records[0].step, records[-1].step]
            for part in report["probe_sets"]:
                for var, summary in part["variables"].items():
                    assert summary["end"] == records[-1].get(var, part["probe_set"])
    png = out / f"{db.stem}.png"
    done = runner.invoke(make_app(), ["plot", str(db), "--out", str(png), "--force"])
    assert done.exit_code == 0, done.output
    assert png.stat().st_size > 1000
    return reports
