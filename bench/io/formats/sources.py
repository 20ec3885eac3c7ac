"""What ``dictbench eval A B C ...`` scores: local folders, globs, hub names, releases.

Each argument becomes one or more local SAE folders: a folder or file as is; a glob
(``runs/x/saes/*``) as every match; a folder holding SAE folders (sparsify saves one
per hookpoint) as each of them; ``saelens:RELEASE[/SAE_ID]`` and
``hf://OWNER/REPO/PATH`` downloaded into the HF cache first.
"""

from __future__ import annotations

import glob
import re
from dataclasses import dataclass
from pathlib import Path

from dictbench.errors import UserError
from dictbench.io.formats import detect, hub, sae_folders_below


@dataclass
class Source:
    folder: Path
    sae_id: str | None  # None: the folder's own
    hub: hub.HubSAE | None = None


def _safe_id(text: str) -> str:
    """An id usable as a folder name in the run's results/ (no slashes)."""
    return re.sub(r"[^A-Za-z0-9._=+-]+", "-", text).strip("-.") or "sae"


def _local(arg: str) -> list[Source]:
    if any(c in arg for c in "*?[") and not Path(arg).exists():
        matches = sorted(glob.glob(arg))
        if not matches:
            raise UserError(f"{arg}: the pattern matches no file or folder")
        return [s for m in matches for s in _local(m)]
    path = Path(arg)
    if path.is_dir():
        try:
            detect(path)
        except UserError:
            below = sae_folders_below(path)
            if not below:
                raise
            return [Source(sub, None) for sub in below]
    return [Source(path, None)]


def expand(args: list[str], match: str | None = None) -> list[Source]:
    """Every SAE the arguments name, downloaded when remote; ids made unique."""
    out: list[Source] = []
    directory = None
    for arg in args:
        if arg.startswith(hub.SAELENS_PREFIX):
            directory = directory if directory is not None else hub.read_directory()
            for sae in hub.release_saes(arg, match, directory):
                out.append(Source(hub.download(sae), _safe_id(sae.sae_id), sae))
        elif arg.startswith(hub.HF_PREFIX):
            sae = hub.hf_sae(arg)
            out.append(Source(hub.download(sae), _safe_id(sae.sae_id), sae))
        else:
            out.extend(_local(arg))
    return out


def unique_ids(ids: list[str]) -> list[str]:
    """``ids`` with later repeats suffixed -2, -3, ... so records never overwrite."""
    seen: dict[str, int] = {}
    out = []
    for i in ids:
        n = seen.get(i, 0) + 1
        seen[i] = n
        out.append(i if n == 1 else f"{i}-{n}")
    return out
