"""A language model end to end, offline: save a tiny GPT-2 and its tokenizer, then measure.

    python examples/language_model.py --out runs/lm

1. trains a word-level tokenizer on a few lines (the `tokenizers` library), wraps it in
   `PreTrainedTokenizerFast` (left padding, as generation uses) and saves it with a
   randomly initialised 2-layer GPT-2 (`save_pretrained`), and writes `texts.txt`;
2. runs `cv measure OUT/model --data OUT/texts.txt` (the default output: the logits at
   each text's last real token) and prints the row, which says which output it measured;
3. does the same from Python: `output="next-token"` (one log-probability per text), and
   the sketched traced kernel from 16 random projections of the logits, with its
   standard errors, next to the exact one.

It takes a few seconds on a CPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

LINES = [
    "the cat sat on the mat",
    "a dog ran across the park in the rain",
    "the sun is bright today",
    "birds sing in the morning",
    "my cat likes the warm sun",
    "rain falls on the quiet park",
]


def save_model(out: Path) -> Path:
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    transformers.logging.set_verbosity_error()
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(LINES, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"]))
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", padding_side="left")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=32,
                                     vocab_size=tok.get_vocab_size(), bos_token_id=1,
                                     eos_token_id=1, pad_token_id=0)
    directory = out / "model"
    transformers.GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (out / "texts.txt").write_text("\n".join(LINES) + "\n", encoding="utf-8")
    return directory


def cv(*args: str) -> list[dict]:
    """Run the installed `cv` command (the same Python's) and parse its JSON rows."""
    cmd = [sys.executable, "-m", "cvcore", *args, "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/lm"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    directory = save_model(args.out)
    texts = str(args.out / "texts.txt")
    (row,) = cv("measure", str(directory), "--data", texts, "--max-length", "16")
    print("cv measure:", json.dumps({k: row[k] for k in ("output", "n_samples", "n_outputs",
                                                         "trace", "entropy")}))

    import numpy as np
    from cvcore.adapters.huggingface_loaders import HuggingFaceLoader, TextDataLoader

    import cvcore
    from cvcore.protocols import LoadOptions
    from cvcore.sketch import sketched_kernel

    model = HuggingFaceLoader().load(directory, LoadOptions(max_length=16)).model
    lines = TextDataLoader().load(texts, None)
    nll = cvcore.measure(model, lines, output="next-token")
    print(f"next-token log-probability: trace {nll.trace:.4g}, entropy {nll.entropy:.4f}")
    exact = cvcore.ntk(model, lines)
    sketch = sketched_kernel(model, lines, projections=16, seed=0).statistics
    print(f"last-token logits: exact trace {np.trace(exact):.4g}; sketched (m=16) "
          f"{sketch.trace:.4g} ± {sketch.trace_stderr:.2g}, relative kernel error "
          f"{np.linalg.norm(sketch.kernel - exact) / np.linalg.norm(exact):.3f} "
          f"(reported {sketch.relative_error:.3f})")


if __name__ == "__main__":
    main()
