"""Hub ids without a network: one clear line at once, not a minute of retries.

``huggingface_hub`` retries a failed request with back-off (five times per
file, for every file transformers or PEFT probes), so a hub id typed on an
offline machine looks like a hang for a minute before an error that does not
say what to do. A single TCP connect to the hub endpoint tells within seconds
whether a download can work at all. When it cannot, files already in the
local HF cache are still used; only a real miss fails, with one line.

Light on purpose (``huggingface_hub`` only, no torch): the command line checks
its model id before importing the heavy libraries.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

CONNECT_TIMEOUT_S = 3.0


def is_local(name_or_path) -> bool:
    return os.path.isdir(os.path.expanduser(str(name_or_path)))


def _offline_by_setting() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_reachable() -> bool:
    from huggingface_hub import constants

    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError:
        return False
    return True


def from_pretrained_kwargs(name_or_path, required_file: str, what: str) -> dict:
    """Check that ``name_or_path`` can be loaded and say how: ``{}`` for a
    local directory or a reachable hub, ``{"local_files_only": True}`` when
    only the local cache can serve it. Raises ValueError (one line) when
    ``required_file`` is neither local nor downloadable."""
    if is_local(name_or_path):
        return {}
    offline = _offline_by_setting()
    if not offline and hub_reachable():
        return {}
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(str(name_or_path), required_file), str):
        return {"local_files_only": True}
    reason = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face hub cannot be reached"
    raise ValueError(
        f"cannot load {what} {str(name_or_path)!r}: it is not a local directory, {reason}, and it is not in "
        "the local Hugging Face cache; pass a local directory, or set HF_HUB_OFFLINE=1 once it is cached"
    )
