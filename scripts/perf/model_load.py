"""Where a cold `dictbench` process spends its time before scoring: imports, and loading the
embedded model from its GGUF file against loading the de-quantised copy
(dictbench.data.model_cache) that the first load writes beside the activation cache.

One process, in order: import torch, import dictbench's eval, import the transformers
model classes, tokenizer from the GGUF file, model from the GGUF file (parse and
de-quantise), write the copy, tokenizer and model from the copy; then the copy's
weights and logits are checked to equal the GGUF-loaded ones exactly. Prints seconds
per step and the load average; the CSV goes to --out (results/perf/model_load.csv).

    python scripts/perf/model_load.py
"""

from __future__ import annotations

import time

T0 = time.perf_counter()
import torch  # noqa: E402

T_TORCH = time.perf_counter() - T0

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402


def timed(steps: dict[str, float], name: str, fn):
    t0 = time.perf_counter()
    out = fn()
    steps[name] = time.perf_counter() - t0
    print(f"{name:<40} {steps[name]:8.2f} s", flush=True)
    return out


def _transformers():
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401  (lazy: load now)

    return transformers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("results/perf"))
    args = p.parse_args()
    load0 = os.getloadavg()[0]
    steps = {"import torch": T_TORCH}
    print(f"{'import torch':<40} {T_TORCH:8.2f} s")
    timed(steps, "import dictbench (cli, evaluate)", lambda: __import__("dictbench.evaluate"))
    tf = timed(steps, "import transformers model classes", _transformers)
    from dictbench.data import model_cache
    from dictbench.data.subject import _GGUF_FILE, embedded_model_folder

    where = embedded_model_folder()
    tok = timed(steps, "tokenizer from GGUF", lambda: tf.AutoTokenizer.from_pretrained(
        where, gguf_file=_GGUF_FILE))  # fmt: skip
    model = timed(steps, "model from GGUF (parse, de-quantise)", lambda: (
        tf.AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, gguf_file=_GGUF_FILE)
    ))  # fmt: skip
    folder = Path(tempfile.mkdtemp(prefix="model_load-")) / "copy"
    timed(steps, "write the copy", lambda: model_cache.write_copy(folder, model, tok))
    tok2 = timed(steps, "tokenizer from the copy", lambda: tf.AutoTokenizer.from_pretrained(
        str(folder)))  # fmt: skip
    model2 = timed(steps, "model from the copy", lambda: tf.AutoModelForCausalLM.from_pretrained(
        str(folder), dtype="float32"))  # fmt: skip
    text = "The state of the Union is strong, and together we will keep it so."
    ids = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        same_logits = torch.equal(model(ids).logits, model2(ids).logits)
    a, b = model.state_dict(), model2.state_dict()
    same_weights = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    same_tokens = tok2.encode(text) == tok.encode(text)
    load1 = os.getloadavg()[0]
    print(f"identical: weights {same_weights}, logits {same_logits}, tokens {same_tokens}")
    print(f"load average {load0:.2f} -> {load1:.2f} on {os.cpu_count()} CPUs")
    if not (same_weights and same_logits and same_tokens):
        sys.exit("the copy differs from the GGUF load")
    import pandas as pd

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import perf_common as pc

    rows = [{"step": k, "seconds": v, "load_before": load0, "load_after": load1}
            for k, v in steps.items()]  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    pc.write_csv(pd.DataFrame(rows), args.out / "model_load.csv")


if __name__ == "__main__":
    main()
