"""Hub access: load a transformers checkpoint from a local directory or a hub id, failing fast offline.

Only safetensors weights are loaded and no remote code runs (`trust_remote_code` is never set).
A local checkpoint's revision is a fingerprint of its files, so reruns can tell models apart.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from raypose.errors import SpecError

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
LOCAL_REVISION_PREFIX = "sha256:"


def load_pretrained(load, model: str, revision: str | None, field: str, *args, **kwargs):
    """Call a transformers loader; a checkpoint that cannot be fetched fails fast with a fix."""
    ref = model
    local = Path(ref).expanduser()
    if local.is_dir():
        ref = str(local)
    elif not HUB_ID.fullmatch(ref) or local.exists():
        raise SpecError(f"{field}: {ref} is not a directory (nor a hub id like 'owner/name')")
    else:
        try:
            return load(ref, *args, revision=revision, local_files_only=True, **kwargs)
        except OSError:
            pass  # not in the local cache: go to the hub
        if not hub_reachable():
            raise SpecError(
                f"{field}: cannot fetch {ref!r}: the Hugging Face hub is not reachable from here "
                "and the checkpoint is not in the local cache. Download it where there is network "
                f"(`hf download {ref} --local-dir DIR`), copy DIR here and set {field}: DIR"
            )
    try:
        return load(ref, *args, revision=revision, **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SpecError(f"{field}: cannot load {ref!r}: {first}") from exc


def hub_revision(revision: str) -> str | None:
    """The revision to ask the hub for: none for a local checkpoint, whose revision is raypose's fingerprint."""
    return None if revision.startswith(LOCAL_REVISION_PREFIX) else revision


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub (HF_ENDPOINT) answers a TCP connection; never with HF_HUB_OFFLINE."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def local_fingerprint(model: str) -> str:
    """For a local checkpoint: sha256 over its config and weight files, so reruns can tell models apart."""
    digest = hashlib.sha256()
    root = Path(model)
    for path in sorted(root.glob("*.json")) + sorted(root.glob("*.safetensors")):
        digest.update(path.name.encode())
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return LOCAL_REVISION_PREFIX + digest.hexdigest()[:16]
