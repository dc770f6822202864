"""A short atheris run over the loaders, seeded with valid files of every format."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("atheris")
torch = pytest.importorskip("torch")


@pytest.mark.slow
def test_atheris_finds_no_crash_in_the_loaders(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    torch.save(model, corpus / "module.pt")
    torch.save(model.state_dict(), corpus / "state.pt")
    torch.export.save(torch.export.export(model, (torch.randn(2, 3),)), corpus / "prog.pt2")
    np.save(corpus / "x.npy", np.eye(3))
    np.savez(corpus / "x.npz", a=np.eye(2))
    # atheris takes one leading byte for the extension: prefix each seed with one.
    for i, seed in enumerate(sorted(corpus.iterdir())):
        seed.write_bytes(bytes([i % 9]) + seed.read_bytes())
    script = Path(__file__).parents[1] / "fuzz" / "fuzz_loaders.py"
    # libFuzzer reads its RSS as the process's peak, which Linux carries over from this
    # (forking) pytest process into the child: allow 4 GiB above what pytest has reached.
    inherited_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    done = subprocess.run(
        [sys.executable, str(script), "-runs=400", "-max_len=8192", "-timeout=30",
         f"-rss_limit_mb={inherited_mb + 4096}", f"-artifact_prefix={tmp_path}/",
         str(corpus)],  # a crash, leak or out-of-memory input lands in tmp_path, not here
        capture_output=True, text=True, timeout=600, check=False)
    tail = done.stderr[-3000:]
    assert done.returncode == 0, tail
    assert "Done 400 runs" in done.stderr or "DONE" in done.stderr, tail
