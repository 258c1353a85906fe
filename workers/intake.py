"""Reading jobs-stream entries: stream replies into entries, and the limits a job must meet."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from typing import Any, TypeAlias

from shared.codec import BadJob, text
from shared.protocol import Job
from shared.settings import Settings

Fields: TypeAlias = dict[bytes | str, bytes | str]
Entry: TypeAlias = tuple[str, Fields]

# The rules Job puts on its ids: a refused entry's ids are used in keys only when they meet them.
_MAX_ID = 128
_SESSION_ID = re.compile(r"^[A-Za-z0-9_\-.:]+$")


def stream_entries(reply: Any) -> list[Entry]:
    """The entries of an XREAD/XREADGROUP reply, whichever shape redis-py (or shared.wire,
    raw RESP2) gave it."""
    if not reply:
        return []
    resp3 = isinstance(reply, dict)
    per_stream = reply.values() if resp3 else (item[1] for item in reply)
    out: list[Entry] = []
    for entries in per_stream:
        # RESP3 replies wrap each stream's entries in one more list.
        if resp3 and entries and isinstance(entries[0], list):
            entries = entries[0]
        for entry_id, fields in entries:
            if fields is None:  # the entry was deleted while pending
                continue
            if isinstance(fields, list):  # a raw RESP2 reply (shared.wire): field, value, ...
                fields = dict(zip(fields[::2], fields[1::2], strict=True))
            out.append((text(entry_id), fields))
    return out


def usable_ids(bad: BadJob) -> tuple[str | None, str | None]:
    """The job id and session id of a refused entry that are safe to name keys after."""
    job_id = bad.job_id if bad.job_id and len(bad.job_id) <= _MAX_ID else None
    sid = bad.session_id
    session_id = sid if sid and len(sid) <= _MAX_ID and _SESSION_ID.match(sid) else None
    return job_id, session_id


def check_limits(job: Job, settings: Settings) -> None:
    """Raise BadJob for a well-formed job this worker must still refuse."""
    ids = {"id": job.id, "session_id": job.session_id}
    if job.model is not None and job.model != settings.model:
        raise BadJob(
            "unknown_model",
            f"job is for model {job.model!r} but was queued on {settings.model!r}'s stream",
            ids,
        )
    if job.prompt_chars() > settings.max_prompt_chars:
        raise BadJob(
            "prompt_too_large",
            f"prompt has {job.prompt_chars()} characters; the limit is {settings.max_prompt_chars}",
            ids,
        )
    if job.max_tokens is not None and job.max_tokens > settings.max_tokens_limit:
        raise BadJob(
            "max_tokens_too_large",
            f"max_tokens is {job.max_tokens}; the limit is {settings.max_tokens_limit}",
            ids,
        )


def fields_json(fields: Mapping[bytes | str, bytes | str]) -> str:
    """An entry's raw fields as JSON; values that are not UTF-8 (msgpack) as {"base64": ...}."""
    out: dict[str, Any] = {}
    for name, value in fields.items():
        key = name.decode(errors="replace") if isinstance(name, bytes) else name
        if isinstance(value, bytes):
            try:
                out[key] = value.decode()
            except UnicodeDecodeError:
                out[key] = {"base64": base64.b64encode(value).decode()}
        else:
            out[key] = value
    return json.dumps(out, ensure_ascii=False)
