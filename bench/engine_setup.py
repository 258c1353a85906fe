"""The engine arguments of the engine scenario: the worker's own, handed to every system.

``engine_arguments`` (workers/vllm_engine.py) turns tokenbus settings into ``AsyncEngineArgs``;
the bench computes them once per model from the settings it gives the worker, passes the same
dict to ``AsyncLLM`` and, as flags, to vLLM's server, and checks with vLLM's own parser that
those flags give back equal ``AsyncEngineArgs``, every field (defaults included).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.settings import BUNDLED_MODEL, Settings

#: --models names: the tiny random model (built offline) and the bundled SmolLM2.
MODELS = ("tiny", "smollm2")
#: Context for SmolLM2 (its own is 8192): a prompt and 128 tokens need far less, and a CPU box
#: has no memory to spare.
SMOLLM2_CONTEXT = 2048


@dataclass
class EngineSetup:
    """One model as every system runs it."""

    label: str  # tiny, smollm2
    served: str  # the model name clients ask for
    settings: Settings  # the worker's (redis_url is set per tokenbus start)
    args: dict[str, Any]  # AsyncEngineArgs, identical for the three systems
    env: dict[str, str]  # environment every engine process gets (VLLM_CPU_KVCACHE_SPACE)
    on_cpu: bool

    def describe(self) -> str:
        shown = {k: v for k, v in self.args.items()}
        env = " ".join(f"{k}={v}" for k, v in self.env.items())
        return f"{json.dumps(shown)}" + (f" with {env}" if env else "")


def model_folder(label: str, workdir: Path, settings: Settings) -> tuple[str, str]:
    """(served name, weights folder) of ``label``; built or converted here when needed."""
    if label == "tiny":
        from bench.tiny_model import build_tiny_model

        return "tiny", str(build_tiny_model(workdir / "tiny-model"))
    if label == "smollm2":
        from workers.models import prepare_bundled

        return BUNDLED_MODEL, str(prepare_bundled(settings))
    raise ValueError(f"unknown model {label!r}; known: {', '.join(MODELS)}")


def on_cpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def engine_setup(label: str, workdir: Path, *, slots: int, extra_args: str = "") -> EngineSetup:
    """The settings and engine arguments of ``label``: this environment's, sized for the run.

    ``slots`` (the highest concurrency, at least the worker's default) becomes the worker's
    slots and so vLLM's ``max_num_seqs``; the context is the tiny model's own (512) or 2048
    for SmolLM2, unless ``TOKENBUS_MAX_MODEL_LEN`` says otherwise.
    """
    from bench.tiny_model import CONTEXT
    from workers.vllm_engine import engine_arguments

    base = Settings()
    served, source = model_folder(label, workdir, base)
    context = base.max_model_len or (CONTEXT if label == "tiny" else SMOLLM2_CONTEXT)
    settings = base.model_copy(
        update={
            "engine": "vllm",
            "model": served,
            "default_model": served,
            "model_path": source,
            "max_model_len": context,
            "worker_slots": max(slots, base.worker_slots),
            "engine_args": extra_args or base.engine_args,
        }
    )
    cpu = on_cpu()
    env = {"VLLM_CPU_KVCACHE_SPACE": str(settings.cpu_kv_cache_gib)} if cpu else {}
    args = engine_arguments(settings, source, on_cpu=cpu)
    return EngineSetup(label, served, settings, args, env, cpu)


def server_flags(args: dict[str, Any]) -> list[str]:
    """``AsyncEngineArgs`` as the command line of vLLM's server."""
    flags: list[str] = []
    for key, value in args.items():
        name = key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(f"--{name}" if value else f"--no-{name}")
        elif isinstance(value, list | tuple):
            flags += [f"--{name}", *(str(v) for v in value)]
        elif isinstance(value, dict):
            flags += [f"--{name}", json.dumps(value)]
        else:
            flags += [f"--{name}", str(value)]
    return flags


def check_server_flags(args: dict[str, Any], flags: Sequence[str]) -> tuple[list[str], list[str]]:
    """How vLLM's server, given ``flags``, would build other ``AsyncEngineArgs`` than ``args``.

    Two lists: fields of ``args`` it would get otherwise (the flags are wrong), and other
    fields whose server default is not ``AsyncEngineArgs``' own and not merely another unset
    value (None, False, ''): vLLM's server as shipped, worth knowing.
    """
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parsed = make_arg_parser(FlexibleArgumentParser()).parse_args(list(flags))
    served = AsyncEngineArgs.from_cli_args(parsed)
    direct = AsyncEngineArgs(**args)
    wrong: list[str] = []
    other: list[str] = []
    for f in dataclasses.fields(AsyncEngineArgs):
        theirs, ours = getattr(served, f.name), getattr(direct, f.name)
        if theirs == ours or (f.name not in args and not theirs and not ours):
            continue
        line = f"{f.name}: server {theirs!r}, AsyncEngineArgs {ours!r}"
        (wrong if f.name in args else other).append(line)
    return wrong, other


def worker_env(settings: Settings, redis_url: str, base: dict[str, str]) -> dict[str, str]:
    """The environment of a tokenbus process: every setting explicit, on ``redis_url``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENBUS_")}
    env.pop("REDIS_URL", None)
    for name, value in settings.model_copy(update={"redis_url": redis_url}).model_dump().items():
        env[f"TOKENBUS_{name.upper()}"] = str(value)
    return env | base
