"""`dictbench eval` against SAEBench 0.6's core eval: same SAEs, equal token counts.

Each side scores the same SAELens-layout folders (random l1 SAEs made by dictbench,
d_sae --d-sae, at resid_post.6 of the embedded SmolLM2-135M-Instruct, written with
`dictbench export --format saelens`) as a fresh process: once with one SAE, once with
--saes of them in one call. Recorded: wall time and peak resident memory of each
process (``os.wait4``'s rusage of that child alone), and the load average.

Equal token counts: SAEBench runs --batches x --prompts sequences of 128 tokens for its
CE/KL metrics and as many for its sparsity and variance metrics; dictbench gets
``eval.tokens`` = ``eval.downstream_tokens`` = the same number of tokens (its windows
are 128 tokens with BOS, its counts exclude BOS). dictbench starts cold too: an empty
activation cache, so its harvest is timed; only the model's de-quantised copy is there
(dictbench.data.model_cache writes it once per machine, as the float32 checkpoint SAEBench
reads is made once). Its mean-ablation baseline needs the mean of as many training
tokens, also harvested; SAEBench ablates with zeros only.

Setup, once: `make saebench-setup` (SAEBench, SAELens and TransformerLens in
.venv-saebench, never in dictbench's environment). Then, from dictbench's venv:

    python scripts/vs_saebench.py --saes 8                  # 4+4 batches of 16 x 128
    python scripts/vs_saebench.py --saes 8 --batches 1      # a quicker check
    python scripts/vs_saebench.py --saes 8 --warm           # also dictbench with a warm cache

--warm adds a third side, ``dictbench-warm``: the same dictbench call again, a fresh
process on the activation cache the cold call filled (the evaluation activations, the
training mean and the stored ablated losses), which is what every later eval at that
model, hook and corpus gets. --sides picks the sides to run; with --work naming the
scratch folder of an earlier comparison, ``--sides dictbench-warm`` adds only the warm
rows (to --csv, so the earlier CSV stays).

The model reaches SAEBench by its hub id through a private Hugging Face cache built
here from the embedded model's de-quantised weights (HF_HUB_OFFLINE=1); the data is
the embedded corpus written as a local jsonl folder. The CSV goes to
--out/vs_saebench.csv. Take figures on a quiet machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "perf"))
import perf_common as pc  # noqa: E402

from dictbench.baselines.l1 import L1SAE, L1Config  # noqa: E402
from dictbench.data import model_cache  # noqa: E402
from dictbench.data.corpus import embedded_corpus_files  # noqa: E402
from dictbench.data.subject import EMBEDDED_MODEL, ModelSpec, _load_pretrained  # noqa: E402
from dictbench.io import saelens  # noqa: E402
from dictbench.io.sae_io import save_sae  # noqa: E402

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
ROOT = Path(__file__).resolve().parents[1]
PEER_PYTHON = ROOT / ".venv-saebench" / "bin" / "python"


def make_hub_cache(hf_home: Path) -> None:
    """HF_HOME/hub/models--.../snapshots/<rev>/ with the embedded model as a plain float32
    checkpoint (the de-quantised GGUF weights, lm_head tied) and its tokenizer."""
    repo = hf_home / "hub" / f"models--{HUB_ID.replace('/', '--')}"
    rev = hashlib.sha1(b"dictbench embedded smollm2").hexdigest()
    model, tok = _load_pretrained(ModelSpec(name=EMBEDDED_MODEL, device="cpu"))
    model_cache.write_copy(repo / "snapshots" / rev, model, tok.tok)
    gen = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    (repo / "snapshots" / rev / "generation_config.json").write_text(json.dumps(gen))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(rev)


def make_dataset(folder: Path) -> None:
    """The embedded corpus as one jsonl file: one speech per row (a text dataset, which
    SAELens's offline tokenizer check accepts; a pretokenized one it does not)."""
    folder.mkdir(parents=True)
    with open(folder / "sotu.jsonl", "w") as fh:
        for path in embedded_corpus_files():
            fh.write(json.dumps({"text": Path(path).read_text()}) + "\n")


def make_saes(folder: Path, n: int, d_sae: int, ctx: int) -> list[Path]:
    """n random l1 SAEs saved by dictbench and exported to SAELens's layout, cfg.json
    naming the model by its hub id (for SAEBench; dictbench reads its own key)."""
    out = []
    for i in range(n):
        if (folder / "saelens" / f"sae{i}" / "cfg.json").is_file():  # an earlier comparison's
            out.append(folder / "saelens" / f"sae{i}")
            continue
        torch.manual_seed(i)
        sae = L1SAE(L1Config(d_in=576, d_sae=d_sae))
        own = folder / "dictbench" / f"sae{i}"
        save_sae(sae, own, {"hook": "resid_post.6", "model": EMBEDDED_MODEL, "sae_id": f"sae{i}"})
        exported = saelens.export(own, folder / "saelens" / f"sae{i}")
        cfg = json.loads((exported / "cfg.json").read_text())
        cfg.update(model_name=HUB_ID, context_size=ctx, prepend_bos=True)
        (exported / "cfg.json").write_text(json.dumps(cfg, indent=2))
        out.append(exported)
    return out


def measured(cmd: list[str], env: dict[str, str], log: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of one child process; its output goes to ``log``."""
    with open(log, "w") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"{' '.join(cmd[:4])} ... exited {proc.returncode}:\n{tail}")
    return wall, usage.ru_maxrss / 1024  # Linux reports KiB


def saebench_cmd(saes: list[Path], work: Path, out: Path, args) -> list[str]:
    return [
        str(PEER_PYTHON), str(ROOT / "scripts" / "saebench_core.py"), *map(str, saes),
        "--data", str(work / "data"), "--out", str(out),
        "--batches", str(args.batches), "--prompts", str(args.prompts), "--ctx", str(args.ctx),
    ]  # fmt: skip


def dictbench_cmd(saes: list[Path], out: Path, tokens: int) -> list[str]:
    return [
        sys.executable, "-m", "dictbench.cli", "eval", *map(str, saes), "--out", str(out),
        "--preset", "quickstart",
        "--set", f"eval.tokens={tokens}", "--set", f"eval.downstream_tokens={tokens}",
    ]  # fmt: skip


def headline(side: str, out: Path) -> float | None:
    """The first SAE's CE-loss score, as each side reports it (a sanity check, not a
    comparison: the two sides score different token sets)."""
    try:
        if side == "SAEBench":
            (path,) = sorted(out.glob("*sae0_custom_sae_eval_results.json"))
            res = json.loads(path.read_text())["eval_result_metrics"]
            return float(res["model_performance_preservation"]["ce_loss_score"])
        rec = json.loads((out / "results" / "sae0" / "downstream.json").read_text())
        return float(rec["metrics"]["ce_loss_recovered"])
    except (OSError, ValueError, KeyError):
        return None


def cold_cache(work: Path, n: int) -> Path:
    """An empty activation cache (dictbench harvests, as SAEBench computes, every
    activation) that holds the model's de-quantised copy: written once per machine, as
    SAEBench's side reads the float32 checkpoint made from the same weights."""
    root = work / f"cache-{n}"
    root.mkdir()
    (root / "models").symlink_to(Path(os.environ["DICTBENCH_CACHE"]) / "models")
    return root


def side_command(side: str, n: int, saes: list[Path], work: Path, args) -> tuple:
    """(command, environment, output folder) of one side's call on the first n SAEs."""
    tokens = args.batches * args.prompts * args.ctx
    base = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    out = work / f"{side}-{n}"
    if side == "SAEBench":
        peer_env = {**base, "HF_HOME": str(work / "hf"), "HF_DATASETS_OFFLINE": "1"}
        peer_env["WANDB_MODE"] = "disabled"
        return saebench_cmd(saes[:n], work, out, args), peer_env, out
    if side == "dictbench":
        env = {**base, "DICTBENCH_CACHE": str(cold_cache(work, n))}
    else:  # dictbench-warm: the cache the cold call filled
        filled = work / f"cache-{n}"
        if not filled.is_dir():
            raise SystemExit(f"dictbench-warm needs {filled}: run side dictbench first")
        env = {**base, "DICTBENCH_CACHE": str(filled)}
    return dictbench_cmd(saes[:n], out, tokens), env, out


def run_all(saes: list[Path], work: Path, args) -> list[dict]:
    """Every (side, number of SAEs) run; the CSV is rewritten after each, so an
    interrupted comparison keeps what it measured."""
    tokens = args.batches * args.prompts * args.ctx
    rows = []
    for n in (1, len(saes)) if len(saes) > 1 else (1,):
        for side in args.sides:
            cmd, env, out = side_command(side, n, saes, work, args)
            load0 = pc.load_average()
            wall, rss = measured(cmd, env, work / f"{side}-{n}.log")
            load1 = pc.load_average()
            print(f"{side:>9}, {n} SAE(s): {wall:.1f} s, peak RSS {rss:.0f} MiB (load {load0:.1f})")
            rows.append({
                "side": side, "saes": n, "tokens": tokens, "wall_s": wall,
                "s_per_sae": wall / n, "peak_rss_mib": rss, "ce_score_sae0": headline(side, out),
                "load_before": load0, "load_after": load1, "cpus": os.cpu_count(),
            })  # fmt: skip
            pc.write_csv(pd.DataFrame(rows), args.out / args.csv)
    return rows


def main() -> None:
    p = pc.base_parser(__doc__.splitlines()[0])
    p.add_argument("--saes", type=int, default=8)
    p.add_argument("--d-sae", type=int, default=4608)
    p.add_argument("--batches", type=int, default=4, help="SAEBench batches per metric group")
    p.add_argument("--prompts", type=int, default=16, help="sequences per batch")
    p.add_argument("--ctx", type=int, default=128, help="dictbench's quickstart window")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: temp)")
    p.add_argument(
        "--model-cache", type=Path, default=None,
        help="a dictbench cache folder whose de-quantised model copy to reuse (default: new)",
    )  # fmt: skip
    p.add_argument("--warm", action="store_true", help="also run side dictbench-warm")
    p.add_argument(
        "--sides", nargs="+", choices=("SAEBench", "dictbench", "dictbench-warm"),
        default=None, help="the sides to run, in this order (default: SAEBench dictbench)",
    )  # fmt: skip
    p.add_argument("--csv", default="vs_saebench.csv", help="file name under --out")
    args = p.parse_args()
    if args.sides is None:
        args.sides = ["SAEBench", "dictbench"] + (["dictbench-warm"] if args.warm else [])
    if "SAEBench" in args.sides and not PEER_PYTHON.exists():
        raise SystemExit(f"{PEER_PYTHON} not found: run `make saebench-setup` first")
    work = args.work or Path(tempfile.mkdtemp(prefix="vs_saebench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"scratch folder {work}: hub cache, data, SAEs ...")
    # where the model's copy is read or written once; cold_cache links it
    os.environ["DICTBENCH_CACHE"] = str((args.model_cache or work / "model-cache").resolve())
    if not (work / "hf").exists():  # an earlier comparison's scratch folder keeps these
        make_hub_cache(work / "hf")
    if not (work / "data").exists():
        make_dataset(work / "data")
    saes = make_saes(work / "saes", args.saes, args.d_sae, args.ctx)
    args.out.mkdir(parents=True, exist_ok=True)
    run_all(saes, work, args)
    print(f"wrote {args.out / args.csv}; logs and outputs in {work}")


if __name__ == "__main__":
    main()
