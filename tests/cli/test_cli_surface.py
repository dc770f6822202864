"""What a new user meets in ``cv``: one-line errors over the whole surface, what the output
says, checkpoint series (settings, --force, failed rows), progress, --seed and --version."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

torch = pytest.importorskip("torch")

from cvcore.cli.app import make_app

import cvcore
from cvcore import plugins, progress
from cvcore.data_io import load_bundled
from tests import torch_models as tm

runner = CliRunner()
FACTORY = f"{Path(tm.__file__)}:digits_mlp"


def cv(*args: object):
    return runner.invoke(make_app(), [str(a) for a in args])


def one_line_error(result, *needles: str) -> str:
    """The run exited 2 with exactly one line on stderr, no traceback, containing needles."""
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One file of every format a loader reads, plus a few that none reads."""
    d = tmp_path_factory.mktemp("surface")
    torch.manual_seed(0)
    out = {
        "module": d / "module.pt", "state": d / "state.pt", "script": d / "script.pt",
        "x": d / "x.npy", "npz": d / "two.npz", "text": d / "notes.txt", "empty": d / "empty.pt",
        "csv": d / "rows.csv", "json": d / "cfg.json", "fake_pt": d / "fake.pt",
        "fake_npy": d / "fake.npy", "fake_st": d / "fake.safetensors", "fake_pt2": d / "fake.pt2",
        "fake_keras": d / "fake.keras", "fake_h5": d / "fake.h5", "fake_msgpack": d / "fake.msgpack",
        "dir": d / "adir",
    }
    torch.save(tm.digits_mlp(), out["module"])
    torch.save(tm.digits_mlp().state_dict(), out["state"])
    torch.jit.save(torch.jit.script(tm.digits_mlp()), out["script"])
    np.save(out["x"], np.random.default_rng(0).random((6, 64)).astype(np.float32))
    np.savez(out["npz"], a=np.zeros((3, 64)), b=np.zeros((3, 64)))
    out["text"].write_text("hello\n")
    out["empty"].write_bytes(b"")
    out["csv"].write_text("a,b\n1,2\n")
    out["json"].write_text('{"a": 1}')
    for name in ("fake_pt", "fake_npy", "fake_st", "fake_pt2", "fake_keras", "fake_h5", "fake_msgpack"):
        out[name].write_bytes(b"this is not the format its name says\n" * 4)
    out["dir"].mkdir()
    return out


# --------------------------------------------------------------- the surface, as a table

#: (id, arguments with {name} placeholders for the files above, text the one line contains)
BAD = [
    ("samples-not-int", ["measure", "{module}", "--data", "digits", "--samples", "many"], "samples"),
    ("samples-zero", ["measure", "{module}", "--data", "digits", "--samples", "0"], "--samples"),
    ("samples-too-many", ["measure", "{module}", "--data", "{x}", "--samples", "7"], "between 1 and 6"),
    ("seed-float", ["measure", "{module}", "--data", "digits", "--seed", "1.5"], "seed"),
    ("kernel", ["measure", "{module}", "--data", "digits", "--kernel", "diag"], "kernel"),
    ("dtype", ["measure", "{module}", "--data", "digits", "--dtype", "int8"], "dtype"),
    ("implementation", ["measure", "{module}", "--data", "digits", "--implementation", "fast"], "implementation"),
    ("method", ["measure", "{module}", "--data", "digits", "--method", "magic"], "method"),
    ("probes-one", ["measure", "{module}", "--data", "digits", "--samples", "5", "--method", "stochastic", "--probes", "1"], "probes"),
    ("steps-zero", ["measure", "{module}", "--data", "digits", "--samples", "5", "--method", "stochastic", "--steps", "0"], "steps"),
    ("top-k-negative", ["measure", "{module}", "--data", "digits", "--samples", "5", "--method", "exact", "--top-k", "-1"], "top_k"),
    ("variables", ["measure", "{module}", "--data", "digits", "--variables", "speed"], "variables"),
    ("memory-budget", ["measure", "{module}", "--data", "digits", "--memory-budget", "lots"], "budget"),
    ("backend", ["measure", "{module}", "--data", "digits", "--samples", "4", "--backend", "nope"], "nope"),
    ("output-index", ["measure", "{module}", "--data", "digits", "--samples", "4", "--output", "3"], "output"),
    ("data-missing", ["measure", "{module}", "--data", "nowhere.npy"], "nowhere.npy"),
    ("data-unknown-name", ["measure", "{module}", "--data", "mnist"], "bundled dataset"),
    ("data-text", ["measure", "{module}", "--data", "{text}"], "notes.txt"),
    ("data-npz-no-key", ["measure", "{module}", "--data", "{npz}"], "--key"),
    ("data-npz-bad-key", ["measure", "{module}", "--data", "{npz}", "--key", "c"], "'c'"),
    ("data-wrong-width", ["measure", "{module}", "--data", "iris"], "shape"),
    ("no-data", ["measure", "{module}"], "--data"),
    ("resume-alone", ["measure", "{module}", "--data", "digits", "--resume"], "--csv"),
    ("force-alone", ["measure", "{module}", "--data", "digits", "--force"], "--csv"),
    ("resume-and-force", ["measure", "{module}", "--data", "digits", "--csv", "{csv}", "--resume", "--force"], "both"),
    ("csv-exists", ["measure", "{module}", "--data", "digits", "--csv", "{csv}"], "--force"),
    ("model-args-alone", ["measure", "{state}", "--data", "digits", "--model-args", "{{}}"], "--model"),
    ("model-args-not-json", ["measure", "{state}", "--data", "digits", "--model", FACTORY, "--model-args", "width=3"], "JSON"),
    ("model-args-list", ["measure", "{state}", "--data", "digits", "--model", FACTORY, "--model-args", "[3]"], "JSON object"),
    ("model-args-unknown", ["measure", "{state}", "--data", "digits", "--model", FACTORY, "--model-args", '{{"width": 3}}'], "--model-args"),
    ("model-spec", ["measure", "{state}", "--data", "digits", "--model", "no_colon"], "package.module:factory"),
    ("model-module", ["measure", "{state}", "--data", "digits", "--model", "no_such_pkg.mod:f"], "no_such_pkg"),
    ("model-attr", ["measure", "{state}", "--data", "digits", "--model", f"{Path(tm.__file__)}:nothing"], "nothing"),
    ("state-without-model", ["measure", "{state}", "--data", "digits"], "--model"),
    ("checkpoint-missing", ["measure", "nowhere.pt", "--data", "digits"], "nowhere.pt"),
    ("checkpoint-empty", ["measure", "{empty}", "--data", "digits"], "empty"),
    ("checkpoint-dir", ["measure", "{dir}", "--data", "digits"], "directory"),
    ("checkpoint-text", ["measure", "{text}", "--data", "digits"], "notes.txt"),
    ("checkpoint-npy", ["measure", "{x}", "--data", "digits"], "x.npy"),
    ("checkpoint-csv", ["measure", "{csv}", "--data", "digits"], "rows.csv"),
    ("checkpoint-json", ["measure", "{json}", "--data", "digits"], "cfg.json"),
    ("torchscript-untrusted", ["measure", "{script}", "--data", "digits"], "--trust"),
    ("spectrum-kernel", ["spectrum", "{x}", "--kernel", "diag"], "kernel"),
    ("spectrum-not-square", ["spectrum", "{x}"], "square"),
    ("spectrum-pt", ["spectrum", "{module}"], "module.pt"),
    ("spectrum-tolerance", ["spectrum", "{x}", "--tolerance", "small"], "tolerance"),
    ("spectrum-outputs", ["spectrum", "{x}", "--outputs", "two"], "outputs"),
    ("unknown-option", ["measure", "{module}", "--frobnicate"], "frobnicate"),
    ("unknown-command", ["measurr"], "measurr"),
] + [
    # every checkpoint loader given a file of another format under its own extension
    (f"loader-{name}", ["measure", "{" + name + "}", "--data", "digits"], "fake")
    for name in ("fake_pt", "fake_npy", "fake_st", "fake_pt2", "fake_keras", "fake_h5", "fake_msgpack")
]


@pytest.mark.parametrize(("args", "needle"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_every_wrong_option_is_one_line_and_exit_2(files: dict[str, Path], args: list[str],
                                                    needle: str) -> None:
    names = {k: str(v) for k, v in files.items()}
    result = cv(*(a.format(**names) for a in args))
    one_line_error(result, needle)


def test_usage_errors_say_what_was_wrong_in_one_line() -> None:
    """Typer's own usage errors (a boxed panel by default) are one line too."""
    result = cv("measure", "x.pt", "--samples", "many")
    line = one_line_error(result, "--samples", "integer")
    assert "╭" not in line and "Usage" not in line
    assert cv("--help").exit_code == 0 and "measure" in cv("--help").stdout
    assert cv().exit_code == 0 and "measure" in cv().stdout


# --------------------------------------------------------------- the crashes of the issue


def test_factory_that_needs_arguments(files: dict[str, Path], tmp_path: Path) -> None:
    factory = tmp_path / "arch.py"
    factory.write_text("import torch\n"
                       "def net(width):\n"
                       "    return torch.nn.Sequential(torch.nn.Linear(64, width),"
                       " torch.nn.Tanh(), torch.nn.Linear(width, 10))\n")
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(64, 7), torch.nn.Tanh(), torch.nn.Linear(7, 10))
    torch.save(model.state_dict(), tmp_path / "w.pt")
    bare = cv("measure", tmp_path / "w.pt", "--data", "digits", "--samples", "5", "--model", f"{factory}:net")
    line = one_line_error(bare, "callable with no arguments", "--model-args", "file.py:factory", "width")
    assert "TypeError" not in line
    ok = cv("measure", tmp_path / "w.pt", "--data", "digits", "--samples", "5", "--seed", "2",
            "--model", f"{factory}:net", "--model-args", '{"width": 7}', "--json", "--dtype", "float64")
    assert ok.exit_code == 0, ok.stderr
    x, _ = load_bundled("digits")
    probe = x[np.sort(np.random.default_rng(2).choice(len(x), 5, replace=False))]
    expected = cvcore.measure(model.double(), probe.astype(np.float64), dtype="float64")
    assert json.loads(ok.stdout)[0]["entropy"] == pytest.approx(expected.entropy, rel=1e-9)


def test_pickle_whose_module_is_not_importable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "src" / "elsewhere_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text("import torch\nclass Net(torch.nn.Module):\n"
                                 "    def __init__(self):\n        super().__init__()\n"
                                 "        self.l = torch.nn.Linear(64, 3)\n"
                                 "    def forward(self, x):\n        return self.l(x)\n")
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    from elsewhere_pkg.nets import Net  # type: ignore[import-not-found]

    torch.save(Net(), tmp_path / "net.pt")
    monkeypatch.delitem(sys.modules, "elsewhere_pkg.nets")
    monkeypatch.delitem(sys.modules, "elsewhere_pkg")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path / "src")])
    for trust in ((), ("--trust",)):
        result = cv("measure", tmp_path / "net.pt", "--data", "digits", "--samples", "4", *trust)
        line = one_line_error(result, "'elsewhere_pkg'", "PYTHONPATH", "--model")
        assert "ModuleNotFoundError" not in line
        if not trust:
            assert "not a matter of --trust" in line and "pass --trust" not in line


def test_torchscript_without_trust_says_trust_would_load_it(files: dict[str, Path]) -> None:
    one_line_error(cv("measure", files["script"], "--data", "digits", "--samples", "4"),
                   "TorchScript", "pass --trust to load it")
    ok = cv("measure", files["script"], "--data", "digits", "--samples", "4", "--trust", "--json")
    assert ok.exit_code == 0, ok.stderr


# --------------------------------------------------------------- what the CLI shows


def test_backends_prints_install_commands_with_extras(monkeypatch: pytest.MonkeyPatch) -> None:
    reg = plugins.registry()
    for b in reg.backends.values():
        monkeypatch.setattr(type(b), "available", lambda self: False)
    result = cv("backends")
    assert result.exit_code == 0
    assert "pip install 'cvcore[jax]'" in result.stdout
    assert "pip install 'cvcore[torch]'" in result.stdout


def test_table_explains_headers_convention_and_sample_count(files: dict[str, Path]) -> None:
    result = cv("measure", files["module"], "--data", "digits", "--samples", "9", "--kernel", "full")
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    for header in ("trace/D", "S/lnD", "eff.rank", "self-S", "cov-S"):
        assert f"{header}: " in out  # the legend line names every short header
    assert "full kernel" in out and "N = 9 samples" in out
    whole = cv("measure", files["module"], "--data", "digits", "--variables", "trace")
    assert whole.exit_code == 0, whole.stderr
    assert "all 1797 samples of digits" in whole.stdout and "--samples N" in whole.stdout


def test_version() -> None:
    result = cv("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"cvcore {cvcore.__version__}"


# --------------------------------------------------------------- checkpoint series


def test_resume_refuses_rows_made_with_other_settings(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "s.csv"
    first = cv("measure", files["module"], "--data", "digits", "--samples", "5", "--csv", out)
    assert first.exit_code == 0, first.stderr
    before = out.read_text()
    other = cv("measure", files["module"], "--data", "digits", "--samples", "10", "--csv", out, "--resume")
    one_line_error(other, "samples 5 (in the file) vs 10 (now)", "--force")
    assert out.read_text() == before
    same = cv("measure", files["module"], "--data", "digits", "--samples", "5", "--csv", out,
              "--resume", "--json")
    assert same.exit_code == 0 and json.loads(same.stdout) == []
    with out.open() as fh:
        rows = list(csv.DictReader(fh))
    assert json.loads(rows[0]["settings"])["samples"] == 5


def test_csv_over_existing_rows_needs_resume_or_force(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "s.csv"
    assert cv("measure", files["module"], "--data", "digits", "--samples", "5", "--csv", out).exit_code == 0
    before = out.read_text()
    one_line_error(cv("measure", files["module"], "--data", "digits", "--samples", "6", "--csv", out),
                   "--resume", "--force")
    assert out.read_text() == before
    forced = cv("measure", files["module"], "--data", "digits", "--samples", "6", "--csv", out, "--force")
    assert forced.exit_code == 0
    with out.open() as fh:
        assert [r["n_samples"] for r in csv.DictReader(fh)] == ["6"]


def test_unreadable_checkpoint_is_a_failed_row_and_the_rest_go_on(files: dict[str, Path],
                                                                  tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    torch.manual_seed(1)
    for epoch in (1, 3):
        torch.save(tm.digits_mlp(), run / f"epoch_{epoch}.pt")
    (run / "epoch_2.pt").write_bytes(b"PK\x03\x04 truncated")
    out = tmp_path / "s.csv"
    paths = sorted(run.glob("epoch_*.pt"))
    result = cv("measure", *paths, "--data", "digits", "--samples", "5", "--csv", out, "--json")
    assert result.exit_code == 1
    rows = json.loads(result.stdout)
    assert [Path(r["source"]).name for r in rows] == ["epoch_1.pt", "epoch_2.pt", "epoch_3.pt"]
    assert rows[1]["error"] and "epoch_2.pt" in rows[1]["error"] and rows[1]["entropy"] is None
    assert rows[0]["error"] is None and rows[2]["entropy"] > 0
    assert "1 of 3 checkpoints failed" in result.stderr
    with out.open() as fh:
        table = list(csv.DictReader(fh))
    assert [bool(r["error"]) for r in table] == [False, True, False]
    # --resume measures the failed one again, keeps the others
    torch.save(tm.digits_mlp(), run / "epoch_2.pt")
    again = cv("measure", *paths, "--data", "digits", "--samples", "5", "--csv", out, "--resume", "--json")
    assert again.exit_code == 0, again.stderr
    assert [Path(r["source"]).name for r in json.loads(again.stdout)] == ["epoch_2.pt"]
    # --fail-fast stops at the first failure, as before
    (run / "epoch_2.pt").write_bytes(b"PK\x03\x04 truncated")
    fast = cv("measure", *paths, "--data", "digits", "--samples", "5", "--fail-fast", "--json", "--quiet")
    one_line_error(fast, "epoch_2.pt")
    assert fast.stdout == ""


# --------------------------------------------------------------- feedback and seeds


def test_progress_reports_checkpoints_and_sample_blocks(files: dict[str, Path]) -> None:
    from cvcore.protocols import LoadOptions
    from cvcore.runs import ProbeSpec, measure_checkpoints

    seen: list[tuple[str, int, int | None]] = []
    request = cvcore.api.make_request(memory_budget=4096)  # tiny budget: several sample blocks
    with progress.reporting(lambda *event: seen.append(event)):
        rows = list(measure_checkpoints([files["module"], files["module"].with_name("module.pt")],
                                        probe=ProbeSpec("digits", None, 40, 0), request=request,
                                        options=LoadOptions()))
    assert len(rows) == 1
    assert ("checkpoints", 1, 1) in seen
    blocks = [e for e in seen if e[0] == "sample blocks"]
    assert blocks and blocks[-1][1] == blocks[-1][2] > 1


def test_progress_estimator_products() -> None:
    from cvcore.estimate import estimate

    seen: list[tuple[str, int, int | None]] = []
    torch.manual_seed(0)
    model = tm.digits_mlp()
    x = load_bundled("digits")[0][:12]
    with progress.reporting(lambda *event: seen.append(event)):
        estimate(model, x, method="stochastic", kernel="full", probes=4, steps=5, top_k=3)
    products = [e for e in seen if e[0] == "estimator products"]
    assert products and products[-1][1] == products[-1][2]


def test_progress_unless_quiet_plain_lines_off_a_terminal(monkeypatch) -> None:
    """Off a terminal (a log file, a notebook) progress comes as plain lines with the time
    left, first after PLAIN_INTERVAL seconds; --quiet silences it everywhere."""
    from cvcore.cli import console

    from cvcore import progress

    assert console.progress_wanted(False) and not console.progress_wanted(True)
    out = io.StringIO()
    monkeypatch.setattr(console.sys, "stderr", out)
    times = iter([0.0, 1.0, console.PLAIN_INTERVAL + 1.0, console.PLAIN_INTERVAL + 2.0])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(times))
    with console.progress_bar(True):
        progress.advance("checkpoints", 1, 4)   # 1 s in: nothing yet
        progress.advance("checkpoints", 2, 4)   # 31 s in: 15.5 s each, 2 to go
    assert out.getvalue().splitlines() == [
        "checkpoints: 2/4 (50%), 31.0 s elapsed, about 31.0 s left"]


def test_seed_makes_dropout_under_train_reproducible(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Dropout(0.5),
                                torch.nn.Linear(32, 10))
    torch.save(model, tmp_path / "drop.pt")

    def entropy(seed: int) -> float:
        result = cv("measure", tmp_path / "drop.pt", "--data", "digits", "--samples", "8",
                    "--train", "--seed", seed, "--json")
        assert result.exit_code == 0, result.stderr
        return float(json.loads(result.stdout)[0]["entropy"])

    torch.manual_seed(123)
    a = entropy(5)
    torch.manual_seed(456)
    b = entropy(5)
    assert a == b
    assert entropy(6) != a  # another seed, other masks (and another probe subset)
