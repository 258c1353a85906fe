"""What the bench reads about processes (/proc) and about samples (percentiles)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads) so far; nan when gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return math.nan
    # The command name (field 2) may hold spaces: count fields after its closing parenthesis.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime: fields 14 and 15


def machine_busy_seconds() -> float:
    """CPU time every process on the machine has used so far (all cores, idle and iowait
    excluded): what the bench's own processes did not use of it is other work's."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    guest = sum(fields[8:10])  # already counted in user and nice
    return (sum(fields) - idle - guest) / _TICK


def rss_bytes(pid: int) -> int:
    """Resident memory of process ``pid``; 0 when gone."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return 0


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` (0..100) percentile, nearest rank, of values already sorted; nan when empty."""
    if not values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(values)))
    return float(values[min(rank, len(values)) - 1])
