"""The numbers quoted in docs/cli.md, docs/recording.md and README.md come from the commands
quoted beside them: this test runs those commands on the bundled digits data and checks every
quoted number to the precision printed.

When a change moves a number, the failure message prints the fresh value: paste it into
the doc (and say in the commit what moved it)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from cvcore.cli.app import make_app
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"

pytest.importorskip("torch")
pytestmark = pytest.mark.slow  # trains the demo MLP once (about 10 s of CPU in all)


def demo(out: Path, *args: str) -> None:
    """``python examples/digits_demo.py --out OUT ARGS`` in a fresh interpreter (as the
    docs run it: one torch thread, the demo's own seeds)."""
    subprocess.run([sys.executable, str(ROOT / "examples" / "digits_demo.py"), "--out",
                    str(out), *args], check=True, capture_output=True, text=True,
                   timeout=300)


def cv(*args: object) -> str:
    result = CliRunner().invoke(make_app(), [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.stdout


def decimals(text: str) -> int:
    return len(text.split(".")[1]) if "." in text else 0


NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[+-]?\d+)?")


def unit(token: str) -> float:
    """One unit of the last digit printed: ``0.0204801`` → 1e-7, ``35.478`` → 1e-3."""
    mantissa, _, exponent = token.partition("e")
    return 10.0 ** (-decimals(mantissa) + (int(exponent) if exponent else 0))


def same(quoted: str, fresh: str) -> bool:
    """The same text, numbers allowed to differ by one unit of their last printed digit
    (float32 sums may round the other way on another CPU or thread count)."""
    q, f = NUMBER.split(quoted), NUMBER.split(fresh)
    qn, fn = NUMBER.findall(quoted), NUMBER.findall(fresh)
    if q != f or len(qn) != len(fn):
        return False
    return all(abs(float(a) - float(b)) <= unit(a) * 1.0001 for a, b in zip(qn, fn))


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``make demo``'s training run, with its checkpoints (what both docs quote)."""
    out = tmp_path_factory.mktemp("digits")
    demo(out, "--epochs", "20", "--checkpoints")
    return out


def test_cli_md_measure_example(demo_run: Path) -> None:
    """docs/cli.md, `cv measure`: the demo's checkpoints at epochs 0, 1, 5 and 10."""
    text = (DOCS / "cli.md").read_text()
    assert "python examples/digits_demo.py --out runs/digits --epochs 20 --checkpoints" in text
    assert ("cv measure runs/digits/epoch_{0,1,5,10}.pt --data digits --samples 200 --json"
            in text)
    found = re.search(r"gave, for epochs 0, 1, 5 and 10: trace ([\d., ]+?) and entropy\s+"
                      r"([\d., ]+?) \(traced kernel", text)
    assert found, "the quoted numbers of the cv measure example are missing"
    traces = [t.strip() for t in found.group(1).split(",")]
    entropies = [e.strip() for e in found.group(2).split(",")]
    paths = [demo_run / f"epoch_{e}.pt" for e in (0, 1, 5, 10)]
    rows = json.loads(cv("measure", *paths, "--data", "digits", "--samples", "200",
                         "--json", "-q"))
    by_epoch = {int(Path(r["source"]).stem.split("_")[1]): r for r in rows}
    fresh_t = [f"{by_epoch[e]['trace']:.{decimals(t)}f}" for e, t in zip((0, 1, 5, 10), traces)]
    fresh_s = [f"{by_epoch[e]['entropy']:.{decimals(s)}f}"
               for e, s in zip((0, 1, 5, 10), entropies)]
    assert all(same(a, b) for a, b in zip(traces + entropies, fresh_t + fresh_s)), \
        f"docs/cli.md quotes trace {traces}, entropy {entropies}; now {fresh_t}, {fresh_s}"


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("│").split("│")]


def test_recording_md_report_excerpt(demo_run: Path) -> None:
    """docs/recording.md, `cv report` after `make demo`: every quoted row and line."""
    text = (DOCS / "recording.md").read_text()
    block = re.search(r"```\n\$ cv report runs/digits/run.db[^\n]*\n(.*?)```", text, re.DOTALL)
    assert block, "the cv report excerpt is missing from docs/recording.md"
    quoted = [line for line in block.group(1).splitlines() if line.strip()]
    assert len(quoted) >= 4
    makefile = (ROOT / "Makefile").read_text()
    assert "examples/digits_demo.py --out $(RUNS) --epochs 20" in makefile
    out = cv("report", demo_run / "run.db")
    rows = [cells(line) for line in out.splitlines() if line.startswith("│")]
    lines = [line.rstrip() for line in out.splitlines()]
    for doc_line in quoted:
        if doc_line.startswith("│"):
            want = cells(doc_line)
            assert any(len(r) == len(want) and all(same(a, b) for a, b in zip(want, r))
                       for r in rows), (f"docs/recording.md row {want[:2]} is now "
                                        f"{[r for r in rows if r[:2] == want[:2]]}")
        else:
            assert any(same(doc_line.rstrip(), ln) for ln in lines), (
                f"docs/recording.md line {doc_line!r} is now "
                f"{[ln for ln in lines if ln.split(':')[0] == doc_line.split(':')[0]]}")


def test_same_allows_one_unit_of_the_last_digit() -> None:
    assert same("1.07728 ± 0.0204801", "1.07729 ± 0.0204800")
    assert not same("1.07728 ± 0.0204801", "1.07730 ± 0.0204801")
    assert not same("structure formation (52.6 se)", "within noise (52.6 se)")
    assert same("4.44089e-17", "4.44088e-17") and not same("35.478", "35.48")


def test_readme_demo_paragraph(demo_run: Path) -> None:
    """README.md, the `make demo` paragraph: entropy, its change ± se and how many standard
    errors, the trace's growth, the target alignment, the kernel distance and the step of
    the fastest motion, each to the precision quoted."""
    text = " ".join((ROOT / "README.md").read_text().split())
    found = re.search(
        r"the entropy rose from ([\d.]+) to ([\d.]+) on the train probe \(([\d.]+) ± ([\d.]+), "
        r"(\d+) standard errors over its 10 probe subsets: structure formation\) while the "
        r"trace grew (\d+)-fold, the kernel's alignment with the labels rose from ([\d.]+) to "
        r"([\d.]+) and the kernel ended at distance ([\d.]+) \(1 − cos\) from where it began, "
        r"moving fastest in the first epoch", text)
    assert found, "the README's demo paragraph no longer has the sentence this test reads"
    q = found.groups()
    (summary,) = json.loads(cv("report", demo_run / "run.db", "--json"))
    train = next(p for p in summary["probe_sets"] if p["probe_set"] == "train")
    ent, tr, dyn = train["variables"]["entropy"], train["variables"]["trace"], train["dynamics"]
    assert train["regime"] == "structure formation"
    fresh = [ent["start"], ent["end"], ent["change"], ent["change_se"], train["regime_sigmas"],
             tr["growth_factor"], dyn["alignment_start"], dyn["alignment_end"],
             dyn["distance_total"]]
    # rounded as quoted; a last digit may round the other way (one unit allowed, as above)
    ok = [abs(float(a) - b) <= unit(a) * 1.5001 for a, b in zip(q, fresh)]
    assert all(ok), f"README quotes {q}; the demo now gives {fresh}"
    assert dyn["fastest_step"] == 1, dyn  # the motion from step 0 to 1: the first epoch


def test_readme_kernel_dynamics_table() -> None:
    """README.md, "The kernel against the task": the table and the line under it are what
    ``examples/kernel_dynamics.py`` prints."""
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "kernel_dynamics.py")],
                         check=True, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout
    text = (ROOT / "README.md").read_text()
    assert "OMP_NUM_THREADS=1 .venv/bin/python examples/kernel_dynamics.py" in text
    for name in ("before", "after"):
        row = re.search(rf"^\| {name} \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$",
                        text, re.MULTILINE)
        printed = re.search(rf"^{name}: A = ([\d.]+), rKr/\(\|r\|\^2 TrK\) = ([\d.]+), "
                            rf"c\(10\) = ([\d.]+), \|r\| = ([\d.]+), entropy = ([\d.]+)$",
                            out, re.MULTILINE)
        assert row and printed, (name, out)
        assert all(same(a, b) for a, b in zip(row.groups(), printed.groups())), \
            f"README row {name}: {row.groups()}; the example prints {printed.groups()}"
    motion = re.search(r"kernel distance ([\d.]+), top-10 eigenspace overlap ([\d.]+)", out)
    quoted = re.search(r"Kernel distance between the two kernels ([\d.]+), top-10 eigenspace\s+"
                       r"overlap ([\d.]+)", text)
    assert motion and quoted
    assert all(same(a, b) for a, b in zip(quoted.groups(), motion.groups())), \
        f"README quotes {quoted.groups()}; the example prints {motion.groups()}"
