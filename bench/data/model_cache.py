"""The de-quantised weights of a GGUF subject model, kept as a plain Hugging Face folder.

Why: every dictbench process that loads the embedded model from its GGUF file parses the
file several times (tokenizer, config, weights) and de-quantises every tensor in numpy
before the first token is scored (see docs/scoring-elsewhere.md for the measured share
of `dictbench eval`'s start-up). For one file the result never changes, so the first
load writes it (config, float32 safetensors, tokenizer files) into the dictbench cache
and later loads read that folder instead: the same tensors, so bit-identical logits
(tests/test_model_cache.py compares them).

The folder is named by a key over the GGUF file's size, modification time and SHA-256
and the transformers and gguf versions (the de-quantisation and the tensor-name mapping
live there), so a changed file or library never reads a stale copy. It is written into
a temporary folder and renamed into place, so a reader sees all of it or none; a copy
that fails to load, or no room on the disk, only costs the GGUF load.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dictbench.io.atomic import _umask, file_sha256, fsync_dir

STAMP = "dictbench-gguf-copy.json"  # written last: its presence marks a complete copy
Loader = Callable[[], tuple[Any, Any]]  # () -> (model, tokenizer), from the GGUF file


def cache_key(gguf_path: Path) -> str:
    import gguf
    import transformers

    st = gguf_path.stat()
    parts = [
        str(st.st_size),
        str(st.st_mtime_ns),
        file_sha256(gguf_path),
        transformers.__version__,
        getattr(gguf, "__version__", "unknown"),
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def copy_folder(root: Path, gguf_path: Path) -> Path:
    return Path(root) / "models" / f"{gguf_path.stem}-{cache_key(gguf_path)}"


def _read_copy(folder: Path) -> tuple[Any, Any] | None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (folder / STAMP).is_file():
        return None
    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype="float32")
    except Exception:  # safetensors, tokenizers and json each raise their own kind
        return None  # damaged: load from the GGUF file and write a new copy
    return model, tok


def write_copy(folder: Path, model: Any, tok: Any) -> None:
    """Save the loaded model as a plain float32 checkpoint (the GGUF-loaded model refuses
    ``save_pretrained``), then rename the finished folder into place."""
    from safetensors.torch import save_model

    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        cfg.pop("_name_or_path", None)
        # The GGUF-loaded config names no class; loaders that read it (TransformerLens) need one.
        cfg["architectures"] = cfg.get("architectures") or [type(model).__name__]
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        save_model(model, str(tmp / "model.safetensors"))  # drops the tied lm_head
        tok.save_pretrained(str(tmp))
        (tmp / STAMP).write_text(json.dumps({"source": "gguf", "dtype": "float32"}))
        mode = 0o666 & ~_umask()  # safetensors writes 0600; a cache is shared like any file
        for f in tmp.iterdir():
            f.chmod(mode)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished first: its copy is as good
            shutil.rmtree(tmp, ignore_errors=True)
        fsync_dir(folder.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_abandoned(folder: Path) -> None:
    """Temporary copies left by processes that died while writing one (~0.5 GB each)."""
    for tmp in folder.parent.glob(f".{folder.name}.*.tmp"):
        try:
            os.kill(int(tmp.name.rsplit(".", 2)[-2]), 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:
            pass  # alive, another user's


def _enough_room(where: Path, model: Any) -> bool:
    need = 2 * sum(p.numel() * 4 for p in model.parameters())
    probe = where
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free > need


def load(gguf_path: Path, root: Path | None, from_gguf: Loader) -> tuple[Any, Any]:
    """(float32 model, tokenizer): from the copy in ``root`` when there is one, else
    from the GGUF file (``from_gguf``), writing the copy for next time. ``root`` None
    turns the copy off."""
    if root is None:
        return from_gguf()
    folder = copy_folder(root, gguf_path)
    cached = _read_copy(folder)
    if cached is not None:
        return cached
    model, tok = from_gguf()
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(folder)
        if _enough_room(folder.parent, model):
            if folder.exists():  # a damaged copy: replace it
                shutil.rmtree(folder, ignore_errors=True)
            write_copy(folder, model, tok)
    except (OSError, RuntimeError, ValueError):
        pass  # an unwritable or full cache only costs the GGUF load next time
    return model, tok
