"""Which weights a pretrained part is: recorded when a run begins, compared when a saved model is loaded.

A part named by hub name loads whatever commit its revision (`<part>.revision`, "" for the default branch) points to
now; a part named by local path loads whatever files are there now. So a run records what each name resolved to,
`commit:<hub commit>` or `sha256:<hash of the folder's files>`, in `<part>.resolved` of its config (hence in the
run's `config.yaml`, the model folder's `config.yaml` and, through evaluation, `metrics.json`). A part saved by
reference (frozen, LoRA, DoRA: only its name and adapter are saved) is loaded from its name again; when the name now
resolves to other weights than those recorded, loading says so in one warning line. A model saved before anything
was recorded loads as before, unchecked.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from transformers.utils import cached_file

from vlmlab.config import Config
from vlmlab.log import warn

PARTS = ("vision", "language")
CHUNK = 1 << 20


def folder_hash(folder: Path) -> str:
    """sha256 over every file under `folder` (relative path, size and bytes, in path order); hidden entries such
    as `.git` or `.cache` are left out, since they are not what a checkpoint loads."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if not path.is_file() or any(part.startswith(".") for part in relative.parts):
            continue
        digest.update(f"{relative.as_posix()}\0{path.stat().st_size}\0".encode())
        with path.open("rb") as handle:
            while block := handle.read(CHUNK):
                digest.update(block)
    return digest.hexdigest()


def hub_commit(name: str, revision: str, file: str = "config.json") -> str:
    """The commit hub `revision` of `name` resolves to: the snapshot folder its `file` (config.json, or the GGUF
    file a GGUF-only repo ships) was taken from (the hub cache keeps every file under `snapshots/<commit>/`),
    online or off."""
    path = Path(cached_file(name, file, revision=revision or None))
    parts = path.parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts else ""


def resolve_section(section) -> str:
    """What a part's config section names resolves to now (`resolve`), by its GGUF file where it has one."""
    return resolve(section.model, section.revision, getattr(section, "gguf_file", "") or "config.json")


def resolve(name: str, revision: str = "", file: str = "config.json") -> str:
    """`commit:<hub commit>` of a hub name (by the commit its `file` came from), `sha256:<hash>` of a local folder;
    "" for no name (built from scratch)."""
    if not name:
        return ""
    if Path(name).expanduser().is_dir():
        return f"sha256:{folder_hash(Path(name).expanduser())}"
    try:
        commit = hub_commit(name, revision, file)
    except OSError:  # loaded moments ago: unreachable now only in odd setups; record that nothing is known
        return ""
    return f"commit:{commit}" if commit else ""


def record(config: Config) -> dict[str, str]:
    """Sets `<part>.resolved` of each part to what its name resolves to now; returns them by part. Called when a run
    begins, after the parts are loaded (so a hub commit is the one just downloaded)."""
    for part in PARTS:
        section = getattr(config, part)
        section.resolved = resolve_section(section)
    return {part: getattr(config, part).resolved for part in PARTS}


def described(config: Config) -> dict[str, dict]:
    """What metrics.json says of the pretrained parts: name, revision asked for, weights recorded."""
    return {part: {"model": section.model, "revision": section.revision, "resolved": section.resolved}
            for part in PARTS if (section := getattr(config, part)).model}


def check_reference(section, part: str, where: Path) -> str:
    """For a part saved by reference in the model folder `where`, with config section `section`: warns in one line
    when its name now resolves to other weights than recorded; returns what it resolves to now (the record when
    that is unknown; "" and no check when the saved model recorded nothing, as models saved before this did not)."""
    if not section.resolved:
        return ""
    now = resolve_section(section)
    if now and now != section.resolved:
        if section.resolved.startswith("commit:"):
            commit = section.resolved.removeprefix("commit:")
            fix = f"to load those, set {part}.revision: {commit} in {where / 'config.yaml'}"
        else:
            fix = "the files at that path have changed since"
        warn(f"{part}.model={section.model!r} now resolves to {now}, not to the {section.resolved} this model was "
             f"trained with: results may differ; {fix}")
    return now or section.resolved
