"""SAEs saved by other libraries: which format a folder holds, and exact converters.

A format is recognised from the files in the folder, never from what a config claims
to be, and nothing in a folder is executed: safetensors and ``.npz`` (without pickles)
are plain arrays; dictionary_learning's ``ae.pt`` is read with
``torch.load(weights_only=True)``. Any other pickle is refused unread.
"""

from __future__ import annotations

from pathlib import Path

from dictbench.errors import UserError
from dictbench.io.formats import dictionary_learning, gemma_scope, sparsify
from dictbench.io.formats.base import Converted
from dictbench.io.sae_io import CONFIG, PICKLE_SUFFIXES, WEIGHTS, sae_folder

# name -> (files that identify it, loader); the SAELens/dictbench layout is sae_io's.
FOREIGN = {
    "sparsify": sparsify,
    "dictionary_learning": dictionary_learning,
    "gemma_scope": gemma_scope,
}
SUPPORTED = (
    f"SAELens or dictbench ({WEIGHTS} + {CONFIG}), sparsify ({sparsify.WEIGHTS} + "
    f"{sparsify.CONFIG}), dictionary_learning ({dictionary_learning.WEIGHTS} + "
    f"{dictionary_learning.CONFIG}), Gemma Scope ({gemma_scope.WEIGHTS})"
)

__all__ = ["Converted", "SUPPORTED", "detect", "load_foreign", "sae_folders_below"]


def _listing(folder: Path, limit: int = 8) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    if not names:
        return "it is empty"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return "files: " + ", ".join(names[:limit]) + more


def detect(path: str | Path) -> tuple[str, Path]:
    """(format, folder) for an SAE folder or one of its files: "saelens_layout" (SAELens
    or dictbench, told apart by sae_io/saelens) or a key of ``FOREIGN``."""
    path = Path(path)
    if path.is_file():
        folder = path.parent
        if path.name == dictionary_learning.WEIGHTS and dictionary_learning.matches(folder):
            return "dictionary_learning", folder
        if path.name in (sparsify.WEIGHTS, gemma_scope.WEIGHTS):
            return detect(folder)
        return "saelens_layout", sae_folder(path)  # refuses pickles by name
    if not path.is_dir():
        raise UserError(f"{path}: no such file or folder")
    if (path / WEIGHTS).is_file() and (path / CONFIG).is_file():
        return "saelens_layout", path
    for name, mod in FOREIGN.items():
        if mod.matches(path):
            return name, path
    pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    why = (
        f" ({pickles[0]} is a pickle: read only as dictionary_learning's ae.pt)" if pickles else ""
    )
    raise UserError(
        f"{path}: no SAE format recognised ({_listing(path)}){why}; supported: {SUPPORTED}"
    )


def load_foreign(fmt: str, folder: Path) -> Converted:
    return FOREIGN[fmt].load(folder)


def sae_folders_below(folder: Path) -> list[Path]:
    """The SAE folders directly inside ``folder`` (sparsify saves one per hookpoint)."""
    out = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        try:
            detect(sub)
        except UserError:
            continue
        out.append(sub)
    return out
