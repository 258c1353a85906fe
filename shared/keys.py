"""Every Redis key, stream and channel name, in one place.

Session keys share a ``{session_id}`` hash tag so the publish script touches one cluster slot.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Consumer group every worker of a model joins on that model's jobs stream.
JOBS_GROUP = "workers"
#: Field of a jobs-stream entry that holds the encoded job (JSON text or msgpack).
JOB_FIELD = "job"
#: Field of a session's meta hash: its own history TTL in seconds (publish.lua uses it).
META_TTL_FIELD = "ttl"


class Lease:
    """Fields of a job's lease hash (``Keys.job_lease``); shared/lease.lua and publish.lua
    use the same names, and shared/lease.py passes them in rather than repeating them."""

    OWNER = "owner"  # worker id of the attempt that holds it; "" when handed back or done
    FENCE = "fence"  # grows on every acquire and release: a publish must quote the current one
    ATTEMPTS = "attempts"  # acquisitions in all
    HANDBACKS = "handbacks"  # releases by a draining or cut-off worker (not failures)
    UNTIL = "until"  # Redis time (ms) the lease lapses at unless renewed
    SEQ = "seq"  # last publish batch applied under the current fence (retries are no-ops)
    ENTRY = "entry"  # jobs-stream entry id of the attempt that holds it
    STARTED = "started"  # "1" once an attempt published anything (its StreamStart first)
    DONE = "done"  # "1" once the job's terminal event is published: nothing more, ever
    TOKENS = "tokens"  # answer tokens published, all attempts together
    SPACE = "space"  # what the stored token ids mean (engine and model); "-": unusable


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "tokenbus"

    # Intake
    def jobs_stream(self, model: str) -> str:
        return f"{self.prefix}:jobs:{model}"

    @property
    def dead_letter(self) -> str:
        return f"{self.prefix}:dead"

    @property
    def control(self) -> str:
        """Stream of control entries (cancel) that every worker reads."""
        return f"{self.prefix}:control"

    # Jobs
    def job(self, job_id: str) -> str:
        """Hash: state, attempts, worker, session, model, timestamps."""
        return f"{self.prefix}:job:{job_id}"

    def job_text(self, session_id: str, job_id: str) -> str:
        """String: answer text published so far (lets a later attempt continue it)."""
        return f"{self.prefix}:session:{{{session_id}}}:text:{job_id}"

    def job_token_ids(self, session_id: str, job_id: str) -> str:
        """String: the published answer's token ids, packed little-endian uint32."""
        return f"{self.prefix}:session:{{{session_id}}}:ids:{job_id}"

    def job_lease(self, session_id: str, job_id: str) -> str:
        """Hash (fields: ``Lease``): who runs the job, its fencing token, its progress."""
        return f"{self.prefix}:session:{{{session_id}}}:lease:{job_id}"

    # Sessions
    def session_meta(self, session_id: str) -> str:
        """Hash: epoch, offset (the last one published)."""
        return f"{self.prefix}:session:{{{session_id}}}:meta"

    def session_history(self, session_id: str) -> str:
        """Stream: published events; entry id ``<offset>-0``."""
        return f"{self.prefix}:session:{{{session_id}}}:history"

    def session_conversation(self, session_id: str) -> str:
        """List: the session's finished exchanges (JSON), oldest first."""
        return f"{self.prefix}:session:{{{session_id}}}:conversation"

    def session_idempotency(self, session_id: str, key: str) -> str:
        """String: the job id a client's idempotency key names on this session (it expires)."""
        return f"{self.prefix}:session:{{{session_id}}}:idem:{key}"

    def session_channel(self, session_id: str) -> str:
        return f"{self.prefix}:session:{{{session_id}}}:events"

    def session_id_of_channel(self, channel: str) -> str:
        start = channel.index("{") + 1
        return channel[start : channel.index("}", start)]

    # Workers and gateway
    @property
    def models(self) -> str:
        """Sorted set: model -> unix time a live worker last announced it."""
        return f"{self.prefix}:models"

    def worker(self, worker_id: str) -> str:
        return f"{self.prefix}:worker:{worker_id}"

    @property
    def secret(self) -> str:
        return f"{self.prefix}:secret"
