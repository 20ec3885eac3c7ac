"""SAEs on the Hugging Face hub: SAELens release names and ``hf://OWNER/REPO/PATH``.

``saelens:RELEASE/SAE_ID`` is looked up in SAELens's published directory of
pretrained SAEs (``pretrained_saes.yaml``, MIT-licensed), read from an installed
``sae-lens`` package without importing it, or from the file named by
``DICTBENCH_SAELENS_DIRECTORY``. Its entry gives the hub repository, the folder in it,
and the model. Files are fetched with ``huggingface_hub`` into the standard HF cache
(``HF_HOME``); with ``HF_HUB_OFFLINE=1`` or no network only that cache is read. Only
data files are fetched and nothing fetched is executed.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dictbench.errors import UserError

SAELENS_PREFIX = "saelens:"
HF_PREFIX = "hf://"
DIRECTORY_ENV = "DICTBENCH_SAELENS_DIRECTORY"
# SAELens names models as TransformerLens does; these are the hub ids of the common ones.
TL_TO_HF = {
    "gemma-2-2b": "google/gemma-2-2b",
    "gemma-2-9b": "google/gemma-2-9b",
    "gemma-2-2b-it": "google/gemma-2-2b-it",
    "gemma-2-9b-it": "google/gemma-2-9b-it",
    "gpt2-small": "gpt2",
    "gpt2": "gpt2",
    "pythia-70m-deduped": "EleutherAI/pythia-70m-deduped",
    "pythia-160m-deduped": "EleutherAI/pythia-160m-deduped",
}


@dataclass
class HubSAE:
    """One SAE on the hub: where it is, and what the release says about it."""

    repo_id: str
    path: str  # folder inside the repository ("" for its root)
    sae_id: str
    model: str | None  # a name ``model.name`` can load (hub id), when known
    release: str | None = None


def is_remote(source: str) -> bool:
    return source.startswith((SAELENS_PREFIX, HF_PREFIX))


def directory_path() -> Path:
    env = os.environ.get(DIRECTORY_ENV)
    if env:
        return Path(env)
    spec = importlib.util.find_spec("sae_lens")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "saelens: names need SAELens's directory of releases: pip install --no-deps "
            f"sae-lens, or set {DIRECTORY_ENV} to a copy of its pretrained_saes.yaml"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "pretrained_saes.yaml"


_TOP_KEY = re.compile(r"^([^\s#'\"][^:]*):[ \t]*$", re.MULTILINE)


def read_directory(path: Path | None = None) -> dict[str, str]:
    """Release name -> its YAML text. The file is 1.5 MB; parsing all of it takes
    seconds, so it is split at its top-level keys and only the release asked for is
    parsed (``release_entry``)."""
    path = path or directory_path()
    try:
        text = path.read_text()
    except OSError as e:
        raise UserError(f"{path}: cannot read SAELens's directory ({e.strerror})") from e
    keys = list(_TOP_KEY.finditer(text))
    if not keys:
        raise UserError(f"{path}: expected a mapping of release names")
    ends = [m.start() for m in keys[1:]] + [len(text)]
    return {m.group(1).strip(): text[m.start() : end] for m, end in zip(keys, ends, strict=True)}


def release_entry(directory: dict[str, str], release: str) -> dict[str, Any] | None:
    chunk = directory.get(release)
    if chunk is None:
        return None
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        data = yaml.load(chunk, Loader=loader)  # noqa: S506 - a safe loader
    except yaml.YAMLError as e:
        raise UserError(f"SAELens's directory: release {release} is not valid YAML") from e
    entry = data.get(release) if isinstance(data, dict) else None
    return entry if isinstance(entry, dict) else None


def _model(entry: dict[str, Any]) -> str | None:
    name = entry.get("model")
    if not isinstance(name, str):
        return None
    return TL_TO_HF.get(name, name if "/" in name else None)


def release_saes(
    source: str, match: str | None = None, directory: dict[str, str] | None = None
) -> list[HubSAE]:
    """``saelens:RELEASE/SAE_ID`` as one SAE, or ``saelens:RELEASE`` as every SAE in it
    whose id matches ``match`` (a regular expression, searched)."""
    name = source[len(SAELENS_PREFIX) :]
    release, _, sae_id = name.partition("/")
    directory = directory if directory is not None else read_directory()
    entry = release_entry(directory, release)
    if entry is None or not isinstance(entry.get("repo_id"), str):
        close = difflib.get_close_matches(release, list(directory), n=5, cutoff=0.6)
        hint = f"; similar: {', '.join(close)}" if close else ""
        raise UserError(f"{source}: no release '{release}' in SAELens's directory{hint}")
    saes = [s for s in entry.get("saes") or [] if isinstance(s, dict) and "id" in s]
    if sae_id:
        saes = [s for s in saes if s["id"] == sae_id]
        if not saes:
            raise UserError(f"{source}: release {release} has no SAE '{sae_id}'")
    elif match:
        try:
            pattern = re.compile(match)
        except re.error as e:
            raise UserError(f"--match: not a regular expression ({e})") from e
        saes = [s for s in saes if pattern.search(str(s["id"]))]
        if not saes:
            raise UserError(f"{source}: no SAE id in release {release} matches '{match}'")
    model = _model(entry)
    return [
        HubSAE(entry["repo_id"], str(s.get("path") or ""), str(s["id"]), model, release)
        for s in saes
    ]


def hf_sae(source: str) -> HubSAE:
    """``hf://OWNER/REPO[/PATH]``: a SAELens-layout (or any supported) folder on the hub."""
    parts = source[len(HF_PREFIX) :].strip("/").split("/")
    if len(parts) < 2 or not all(parts[:2]):
        raise UserError(f"{source}: expected hf://OWNER/REPO/PATH")
    path = "/".join(parts[2:])
    return HubSAE("/".join(parts[:2]), path, path.replace("/", "-") or parts[1], None)


def download(sae: HubSAE) -> Path:
    """The SAE's folder in the local HF cache, fetched there first when the hub is
    reachable; one line naming the repository when it is in neither."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = [f"{sae.path}/*"] if sae.path else None
    try:
        root = Path(snapshot_download(sae.repo_id, allow_patterns=patterns))
    except (LocalEntryNotFoundError, OSError, HfHubHTTPError) as e:
        raise UserError(_not_cached(sae, e)) from e
    folder = root / sae.path if sae.path else root
    if not folder.is_dir() or not any(folder.iterdir()):
        raise UserError(_not_cached(sae, None))
    return folder


def _not_cached(sae: HubSAE, err: Exception | None) -> str:
    from huggingface_hub import constants

    where = f"{sae.repo_id}/{sae.path}" if sae.path else sae.repo_id
    why = "the hub cannot be reached (offline)" if constants.HF_HUB_OFFLINE else "download failed"
    detail = f": {type(err).__name__}" if err is not None and not constants.HF_HUB_OFFLINE else ""
    return (
        f"{where}: not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}{detail}"
    )
