"""Every family's example runs end to end (in this process, so CI covers them cheaply)."""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run(name: str, monkeypatch: pytest.MonkeyPatch, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", [name, *args])
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")


def numbers(text: str, key: str) -> list[float]:
    return [float(v) for v in re.findall(rf"{key}=\s*([0-9.eE+-]+)", text)]


def test_graph_example(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch_geometric")
    run("graph_kernel.py", monkeypatch)
    out = capsys.readouterr().out
    assert out.count("family=graph") == 3
    assert "'node-level output'" in out and "'graph-level output'" in out
    assert "N=34" in out and "N=2 " in out and "N=12" in out
    assert all(t > 0 for t in numbers(out, "trace"))


def test_autoencoder_example(monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch")
    run("autoencoder_kernel.py", monkeypatch)
    out = capsys.readouterr().out
    assert out.count("reconstruction (posterior mean)") == 3
    assert out.count("latent (posterior mean)") == 3
    entropies = numbers(out, "entropy")
    assert len(entropies) == 6 and all(0 < s < 4.2 for s in entropies)  # 0 < S < ln 64


def test_rl_example(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                    tmp_path: Path) -> None:
    pytest.importorskip("stable_baselines3")
    run("rl_policy_kernel.py", monkeypatch, "--out", str(tmp_path))
    out = capsys.readouterr().out
    assert (tmp_path / "ppo.zip").is_file() and (tmp_path / "dqn.zip").is_file()
    for label in ("actor (action logits)", "critic (value)", "q (Q-values)"):
        assert label in out
