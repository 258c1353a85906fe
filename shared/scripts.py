"""Loading the Lua scripts, and the packed token ids they store.

Scripts that touch a job's lease get a prelude defining ``F``, the lease's field names from
``shared.keys.Lease``, so the names live in one place for Python and Lua alike.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from importlib import resources

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from shared.keys import Lease


def _lease_fields_prelude() -> str:
    names = {k.lower(): v for k, v in vars(Lease).items() if k.isupper()}
    # "until" is a Lua keyword: the script says F.until_.
    names["until_"] = names.pop("until")
    body = ", ".join(f"{k} = '{v}'" for k, v in sorted(names.items()))
    return f"local F = {{{body}}}\n"


def script_source(name: str) -> str:
    """``shared/<name>.lua``, with the lease field prelude in front."""
    source = resources.files("shared").joinpath(f"{name}.lua").read_text()
    return _lease_fields_prelude() + source


def load_script(redis: Redis, name: str) -> AsyncScript:
    """Register ``shared/<name>.lua`` (with its prelude) on an asyncio client."""
    return redis.register_script(script_source(name))


def pack_ids(ids: Sequence[int]) -> bytes:
    """Token ids as stored beside a job's text: little-endian uint32, 4 bytes each."""
    return struct.pack(f"<{len(ids)}I", *ids)


def unpack_ids(data: bytes) -> list[int]:
    usable = len(data) - len(data) % 4
    return list(struct.unpack(f"<{usable // 4}I", data[:usable]))
