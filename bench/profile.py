"""``--profile DIR``: py-spy records tokenbus's gateway and workers during a measured run.

Each process gets ``DIR/<transport>-<process>.speedscope.json`` (open it in speedscope) and
``DIR/<transport>-<process>.top.txt``: the functions that held the CPU most, by own samples
and by samples with the function anywhere on the stack. ``--nonblocking``: the process is
never paused, but py-spy's own sampling takes CPU, so a profiled run's figures are not used.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.stack import System
    from bench.trial import Trial

RATE_HZ = 100


class Recorder:
    def __init__(self, name: str, pid: int, out: str) -> None:
        self.name = name
        self.out = out
        binary = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
        argv = [binary, "record", "--pid", str(pid), "--nonblocking", "--rate", str(RATE_HZ)]
        argv += ["--format", "speedscope", "-o", out]
        self.log_path = out + ".log"
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen(argv, stdout=log, stderr=log)


def start(trial: Trial, system: System) -> list[Recorder]:
    if system.name != "tokenbus":
        return []
    os.makedirs(trial.profile_dir, exist_ok=True)
    recorders = []
    for name, proc in system.procs.items():
        if name == "redis":
            continue
        out = os.path.join(trial.profile_dir, f"{trial.transport}-{name}.speedscope.json")
        recorders.append(Recorder(name, proc.pid, out))
    return recorders


def stop(recorders: list[Recorder]) -> None:
    """Stop each recorder (it writes its profile on SIGINT) and write its summary."""
    for r in recorders:
        if r.popen.poll() is None:
            r.popen.send_signal(signal.SIGINT)
    for r in recorders:
        try:
            r.popen.wait(30)
        except subprocess.TimeoutExpired:
            r.popen.kill()
            r.popen.wait()
        with contextlib.suppress(OSError, ValueError, KeyError):
            summary = summarize(r.out)
            with open(r.out.replace(".speedscope.json", ".top.txt"), "w") as f:
                f.write(summary)


def summarize(path: str, top: int = 40) -> str:
    """The functions most often on the CPU in a speedscope profile, own and inclusive."""
    with open(path) as f:
        doc = json.load(f)
    frames = doc["shared"]["frames"]
    own: Counter[int] = Counter()
    inclusive: Counter[int] = Counter()
    total = 0
    for prof in doc["profiles"]:
        for stack, weight in zip(prof["samples"], prof["weights"], strict=True):
            if not stack:
                continue
            total += weight
            own[stack[-1]] += weight
            for frame in set(stack):
                inclusive[frame] += weight

    def name(i: int) -> str:
        frame = frames[i]
        where = os.path.basename(str(frame.get("file", "")))
        return f"{frame.get('name')} ({where}:{frame.get('line', '')})"

    unit = doc["profiles"][0].get("unit", "") if doc["profiles"] else ""
    sampled = f"{total:.1f} s of samples" if unit == "seconds" else f"{total} samples"
    lines = [f"{path}: {sampled}, sampled at {RATE_HZ} Hz", "", "own %  function"]
    lines += [f"{100 * n / total:5.1f}  {name(i)}" for i, n in own.most_common(top)]
    lines += ["", "incl % function"]
    lines += [f"{100 * n / total:5.1f}  {name(i)}" for i, n in inclusive.most_common(top)]
    return "\n".join(lines) + "\n"
