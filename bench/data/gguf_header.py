"""Read a GGUF file's metadata key/values without touching its tensors.

Why not ``gguf.GGUFReader`` or ``transformers.AutoConfig``: both parse every tensor
description and memory-map the weights (about 6 s for the embedded 135M model on a busy
machine), while the pre-load checks need two integers (layer count, width). The header
is a flat little-endian list (GGUF v2/v3: magic, version, tensor count, key/value count,
then typed key/values), so reading it is a short loop that stops at the first tensor.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import IO, Any

from dictbench.errors import UserError

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?"}
_SCALARS.update({10: "<Q", 11: "<q", 12: "<d"})
_STRING, _ARRAY = 8, 9


def _read(fh: IO[bytes], fmt: str) -> Any:
    size = struct.calcsize(fmt)
    raw = fh.read(size)
    if len(raw) != size:
        raise ValueError("truncated header")
    return struct.unpack(fmt, raw)[0]


def _string(fh: IO[bytes]) -> str:
    n = _read(fh, "<Q")
    if n > 1 << 24:
        raise ValueError("implausible string length")
    return fh.read(n).decode("utf-8", errors="replace")


def _value(fh: IO[bytes], vtype: int, keep: bool) -> Any:
    if vtype in _SCALARS:
        return _read(fh, _SCALARS[vtype])
    if vtype == _STRING:
        return _string(fh)
    if vtype == _ARRAY:
        itype, count = _read(fh, "<I"), _read(fh, "<Q")
        if itype in _SCALARS and not keep:
            fh.seek(struct.calcsize(_SCALARS[itype]) * count, 1)
            return None
        items = [_value(fh, itype, keep) for _ in range(count)]
        return items if keep else None
    raise ValueError(f"unknown value type {vtype}")


def metadata(path: str | Path, keys: set[str] | None = None) -> dict[str, Any]:
    """The header's key/values (only ``keys`` where given; arrays are skipped then)."""
    try:
        with open(path, "rb") as fh:
            if fh.read(4) != b"GGUF":
                raise ValueError("not a GGUF file")
            version = _read(fh, "<I")
            if version not in (2, 3):
                raise ValueError(f"GGUF version {version} is not supported")
            _read(fh, "<Q")  # tensor count
            out: dict[str, Any] = {}
            for _ in range(_read(fh, "<Q")):
                key, vtype = _string(fh), _read(fh, "<I")
                wanted = keys is None or key in keys
                value = _value(fh, vtype, keep=wanted)
                if wanted:
                    out[key] = value
            return out
    except (OSError, ValueError, struct.error) as e:
        raise UserError(f"{path}: cannot read GGUF metadata ({e})") from None


def layer_count_and_width(path: str | Path) -> tuple[int, int]:
    """(num_hidden_layers, hidden_size) as ``<arch>.block_count`` and
    ``<arch>.embedding_length``, which is what transformers maps them to."""
    arch = metadata(path, {"general.architecture"}).get("general.architecture")
    if not isinstance(arch, str):
        raise UserError(f"{path}: GGUF metadata names no architecture")
    want = {f"{arch}.block_count", f"{arch}.embedding_length"}
    meta = metadata(path, want)
    if not want <= meta.keys():
        raise UserError(f"{path}: GGUF metadata lacks {', '.join(sorted(want - meta.keys()))}")
    return int(meta[f"{arch}.block_count"]), int(meta[f"{arch}.embedding_length"])
