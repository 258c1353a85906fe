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
        argv = [
            binary,
            "record",
            "--pid",
            str(pid),
            "--nonblocking",
            "--gil",
            "--rate",
            str(RATE_HZ),
        ]
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


def summarize(path: str, top: int = 30) -> str:
    """Where the samples of a speedscope profile fall: own time by function and by source
    file, and time with the function anywhere on the stack."""
    with open(path) as f:
        doc = json.load(f)
    frames = doc["shared"]["frames"]

    def function(i: int) -> str:
        frame = frames[i]
        return f"{frame.get('name')} ({os.path.basename(str(frame.get('file', '')))})"

    def source(i: int) -> str:
        file = str(frames[i].get("file", ""))
        if "site-packages/" in file:
            return file.split("site-packages/", 1)[1]
        return os.sep.join(file.split(os.sep)[-2:])

    own: Counter[str] = Counter()
    files: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0.0
    for prof in doc["profiles"]:
        for stack, weight in zip(prof["samples"], prof["weights"], strict=True):
            if not stack:
                continue
            total += weight
            own[function(stack[-1])] += weight
            files[source(stack[-1])] += weight
            for name in {function(i) for i in stack}:
                inclusive[name] += weight
    unit = doc["profiles"][0].get("unit", "") if doc["profiles"] else ""
    sampled = f"{total:.1f} s of samples" if unit == "seconds" else f"{total:.0f} samples"
    lines = [f"{path}: {sampled}, sampled at {RATE_HZ} Hz"]
    for title, counts in (
        ("own %  function", own),
        ("own %  source file", files),
        ("incl % function", inclusive),
    ):
        lines += ["", title]
        lines += [f"{100 * n / total:5.1f}  {name}" for name, n in counts.most_common(top)]
    return "\n".join(lines) + "\n"
