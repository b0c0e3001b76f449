"""What several commands do with the option groups they share (declared in options.py and
engines/settings.py)."""

from __future__ import annotations

from typing import Any


def apply_load_options(load: Any) -> None:
    """--no-verify: checkpoints load without checking their weights' checksums."""
    if load.no_verify:
        from dcpo_cli.files import weights_checksum

        weights_checksum.set_verify(False)


def server_address(address: Any) -> Any:
    """--server-url / --server-token, checked; None without --server-url."""
    if address.url is None:
        return None
    address.check()
    return address
