"""RAY_ADDRESS checked before anything heavy is imported: the command-line tools fail on a wrong
address in a second, not after the ~10 s of torch / diffusers imports (``ray.init`` itself would
retry an unreachable address forever)."""

from __future__ import annotations

import os
import socket


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """RAY_ADDRESS ``[ray://]host:port``: a clear error when nothing listens there."""
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", "local" and other forms: let Ray interpret them
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ValueError(
            f"RAY_ADDRESS={address}: no Ray cluster answers there ({e}). Start one with "
            "`ray start --head`, fix the address, or unset RAY_ADDRESS to train on a local Ray."
        ) from None


def check_ray_address() -> None:
    """The cluster RAY_ADDRESS names (when set) answers; else a ValueError naming it."""
    address = os.environ.get("RAY_ADDRESS")
    if address:
        check_reachable(address)
