"""Where a `--model` name points, decided in seconds: an existing local directory, or a hub id that is cached or
reachable. Without this check a missing directory is reported as a malformed repo id, and an unreachable hub
costs minutes of retries before its error."""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import getproxies, proxy_bypass

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
CONNECT_TIMEOUT_S = 3.0
OFFLINE_HINT = "set HF_HUB_OFFLINE=1 to use only models already in the cache without trying the network"


@dataclass(frozen=True)
class Source:
    name: str  # what from_pretrained is given: a directory or a hub id
    local_only: bool  # load from disk or the cache, never the network


def resolve(name: str, flag: str = "--model") -> Source:
    """A loadable source for `name`, or ValueError saying what is wrong with it (naming `flag`)."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{flag} {name}: is a file; give a model directory (with config.json) or a hub id")
        if not (path / "config.json").exists():
            raise ValueError(f"{flag} {name}: the directory has no config.json, so it is not a saved model")
        return Source(str(path), local_only=True)
    if not HUB_ID.fullmatch(name):
        raise ValueError(f"{flag} {name}: no such directory (and not a hub id, which reads owner/name)")
    cached = _cached(name)
    label = f"{flag} {name}" + ("" if "/" in name else " (no directory of that name here either)")
    if _offline():
        if not cached:
            raise ValueError(
                f"{label}: not in the local Hugging Face cache, and HF_HUB_OFFLINE is set; unset it to download, "
                "or give a local directory"
            )
        return Source(name, local_only=True)
    host = _hub_host()
    if not _reachable(host):
        if cached:
            return Source(name, local_only=True)  # the cache has it: no minutes of retries against a dead hub
        raise ValueError(
            f"{label}: cannot reach the Hugging Face hub ({host[0]}) and the model is not in the local cache; "
            f"check the network or give a local directory ({OFFLINE_HINT})"
        )
    return Source(name, local_only=False)


def _offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return env in ("1", "ON", "YES", "TRUE") or bool(constants.HF_HUB_OFFLINE)


def _cached(repo: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo, "config.json"), str)
    except Exception:  # a name the hub client rejects is simply not cached
        return False


def _hub_host() -> tuple[str, int]:
    """(host, port) a request to the hub connects to first: its proxy if one applies, else the hub itself."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    proxy = getproxies().get(url.scheme)
    if proxy and not proxy_bypass(host):
        p = urlparse(proxy if "://" in proxy else "http://" + proxy)
        return p.hostname or host, p.port or 80
    return host, port


def _reachable(host: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(host, timeout=CONNECT_TIMEOUT_S):
            return True
    except OSError:  # no DNS, refused, unroutable or timed out
        return False
