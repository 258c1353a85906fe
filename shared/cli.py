"""The ``tokenbus`` command: run the stack, one part of it, or small operational tasks.

``tokenbus up`` starts Redis (or uses the one configured), a gateway and workers as child
processes. This module never imports ``gateway`` or ``workers``: it only spawns them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import redis
from pydantic import AliasChoices, ValidationError

from shared.embedded_redis import free_port, redis_server_argv
from shared.keys import Keys
from shared.protocol import Job, job_json_schema
from shared.settings import BUNDLED_MODEL, Settings, redact_url

DEFAULT_SCHEMA_PATH = Path("schema") / "job.v1.json"
_T = TypeVar("_T")


class CliError(Exception):
    """A failure worth one clear line, not a traceback."""


def _say(message: str) -> None:
    print(f"tokenbus: {message}", flush=True)


def _run_async(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run ``coro`` on uvloop where it is installed."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every platform we run
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result: _T = runner.run(coro)
        return result


# ---------------------------------------------------------------------------------------------
# schema, settings


def schema_text() -> str:
    """The job JSON Schema as it is kept in ``schema/job.v1.json``."""
    return json.dumps(job_json_schema(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _cmd_schema(args: argparse.Namespace) -> int:
    text = schema_text()
    if args.out == "-":
        sys.stdout.write(text)
        return 0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(out, flush=True)
    return 0


def env_names(name: str) -> list[str]:
    """Environment variables that set the field ``name`` of Settings, preferred first."""
    alias = Settings.model_fields[name].validation_alias
    if isinstance(alias, AliasChoices):
        return [str(choice) for choice in alias.choices]
    return [f"TOKENBUS_{name.upper()}"]


def _default_text(value: object) -> str:
    if value == "":
        return '`""`'
    return f"`{value}`"


def settings_markdown() -> str:
    """The README's settings table, from ``Settings.model_fields``."""
    lines = ["| Variable | Default | Description |", "| --- | --- | --- |"]
    for name, info in Settings.model_fields.items():
        variables = " or ".join(f"`{var}`" for var in env_names(name))
        description = (info.description or "").replace("|", "\\|")
        lines.append(f"| {variables} | {_default_text(info.default)} | {description} |")
    return "\n".join(lines) + "\n"


def _cmd_settings(args: argparse.Namespace) -> int:
    if args.markdown:
        sys.stdout.write(settings_markdown())
        return 0
    # Redacted: this output lands in terminals, tickets and CI logs.
    for name, value in Settings().redacted().items():
        print(f"{env_names(name)[0]}={value}")
    return 0


# ---------------------------------------------------------------------------------------------
# enqueue


async def _enqueue(settings: Settings, job: Job, model: str, encoding: str) -> str:
    from shared.jobs import enqueue
    from shared.redis_client import connect

    client = connect(settings)
    try:
        await enqueue(
            client,
            Keys(settings.key_prefix),
            job,
            model=model,
            jobs_maxlen=settings.jobs_maxlen,
            job_ttl_s=settings.job_ttl_s,
            encoding="msgpack" if encoding == "msgpack" else "json",
        )
    finally:
        await client.aclose()
    return job.id


def _cmd_enqueue(args: argparse.Namespace) -> int:
    settings = Settings()
    model = args.model or settings.default_model
    max_tokens = args.max_tokens
    if max_tokens is not None and max_tokens > settings.max_tokens_limit:
        raise CliError(f"--max-tokens {max_tokens} is above {settings.max_tokens_limit}")
    try:
        fields: dict[str, Any] = {
            "session_id": args.session,
            "prompt": args.prompt,
            "model": model,
            "max_tokens": max_tokens,
            "on_disconnect": args.on_disconnect,
        }
        if args.job_id:
            fields["id"] = args.job_id
        job = Job.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "job"
        raise CliError(f"invalid job: {where}: {first['msg']}") from exc
    try:
        job_id = _run_async(_enqueue(settings, job, model, args.encoding))
    except (redis.RedisError, OSError) as exc:
        raise CliError(f"cannot enqueue on {redact_url(settings.redis_url)}: {exc}") from exc
    print(job_id, flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# token: what a service that names its own sessions needs to read them through a gateway


async def _token(settings: Settings, session_id: str) -> str:
    from shared.redis_client import connect
    from shared.tokens import shared_secret, sign

    client = connect(settings)
    try:
        secret = await shared_secret(client, Keys(settings.key_prefix), settings.secret)
    finally:
        await client.aclose()
    return sign(secret, session_id)


def _cmd_token(args: argparse.Namespace) -> int:
    settings = Settings()
    try:
        Job(session_id=args.session_id, prompt="")  # the same rules as a job's session id
    except ValidationError as exc:
        raise CliError(f"invalid session id: {exc.errors()[0]['msg']}") from exc
    try:
        print(_run_async(_token(settings, args.session_id)), flush=True)
    except (redis.RedisError, OSError) as exc:
        where = redact_url(settings.redis_url)
        raise CliError(f"cannot read the session secret from {where}: {exc}") from exc
    return 0


# ---------------------------------------------------------------------------------------------
# gateway, worker: exec one part


def _exec_module(module: str, overrides: dict[str, str]) -> NoReturn:
    env = {**os.environ, **overrides}
    argv = [sys.executable, "-m", module]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)


def _worker_env(args: argparse.Namespace) -> dict[str, str]:
    env: dict[str, str] = {}
    if args.engine:
        env["TOKENBUS_ENGINE"] = args.engine
    if args.model:
        env["TOKENBUS_MODEL"] = args.model
    if args.slots is not None:
        env["TOKENBUS_WORKER_SLOTS"] = str(args.slots)
    return env


def _gateway_env(args: argparse.Namespace) -> dict[str, str]:
    env: dict[str, str] = {}
    if args.host:
        env["TOKENBUS_HOST"] = args.host
    if args.port is not None:
        env["TOKENBUS_PORT"] = str(args.port)
    return env


def _cmd_gateway(args: argparse.Namespace) -> int:
    _exec_module("gateway", _gateway_env(args))


def _cmd_worker(args: argparse.Namespace) -> int:
    _exec_module("workers", _worker_env(args))


# ---------------------------------------------------------------------------------------------
# prepare-model: convert the bundled model once


def _needs_bundled(settings: Settings, args: argparse.Namespace) -> bool:
    engine = args.engine or settings.engine
    model = args.model or settings.model
    return engine == "vllm" and not settings.model_path and model == BUNDLED_MODEL


def _prepare_argv(force: bool) -> list[str]:
    # In a child: the conversion lives with the workers and imports torch and transformers.
    return [sys.executable, "-m", "workers.models", *(["--force"] if force else [])]


def _cmd_prepare_model(args: argparse.Namespace) -> int:
    return subprocess.call(_prepare_argv(args.force))


# ---------------------------------------------------------------------------------------------
# up: the whole stack


def _port_in_use(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _redis_answers(url: str, timeout: float = 1.0) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    except ValueError:
        return False
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen[bytes]


@dataclass
class _Stack:
    """Processes started by ``tokenbus up``; stopped in reverse order of need."""

    grace_s: float
    children: list[_Child] = field(default_factory=list)
    redis: _Child | None = None
    redis_dir: str | None = None
    signals: list[int] = field(default_factory=list)

    def on_signal(self, signum: int, _frame: object) -> None:
        self.signals.append(signum)

    @property
    def stopping(self) -> bool:
        return bool(self.signals)

    def spawn(self, name: str, argv: Sequence[str], env: dict[str, str]) -> _Child:
        # A session of their own: a terminal's Ctrl-C reaches only us, and we forward it once,
        # after which each child gets the grace period to finish in-flight work.
        proc = subprocess.Popen(list(argv), env=env, start_new_session=True)
        child = _Child(name, proc)
        self.children.append(child)
        _say(f"started {name} (pid {proc.pid}): python {' '.join(argv[1:])}")
        return child

    def dead_child(self) -> _Child | None:
        for child in self.children:
            if child.proc.poll() is not None:
                return child
        return None

    def start_redis(self) -> str:
        binary = shutil.which("redis-server")
        if binary is None:
            raise CliError(
                "no Redis answers and redis-server is not installed: "
                "`make setup` (or `apt-get install redis-server`) installs it"
            )
        self.redis_dir = tempfile.mkdtemp(prefix="tokenbus-redis-")
        port = free_port()
        log = Path(self.redis_dir) / "redis.log"
        argv = redis_server_argv(binary, port, self.redis_dir, str(log))
        proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.redis = _Child("redis-server", proc)
        url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + 15.0
        while not _redis_answers(url, timeout=0.5):
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise CliError(f"redis-server exited with code {proc.returncode}\n{tail}")
            if self.stopping:
                raise CliError("interrupted while starting redis-server")
            if time.monotonic() > deadline:
                raise CliError(f"redis-server did not answer PING on {url}")
            time.sleep(0.05)
        _say(f"redis    {url} (embedded redis-server, pid {proc.pid}, nothing kept on disk)")
        return url

    def stop(self) -> None:
        forward = self.signals[0] if self.signals else signal.SIGTERM
        live = [c for c in self.children if c.proc.poll() is None]
        for child in live:
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(forward)
        # Wait out the grace period; a second Ctrl-C (or its end) kills what is left.
        asked = len(self.signals)
        deadline = time.monotonic() + self.grace_s
        while any(c.proc.poll() is None for c in live):
            if time.monotonic() > deadline or len(self.signals) > asked:
                for child in live:
                    if child.proc.poll() is None:
                        _say(f"{child.name} (pid {child.proc.pid}) still running: killing it")
                        child.proc.kill()
                        child.proc.wait()
                break
            time.sleep(0.05)
        for child in live:
            _say(f"stopped {child.name} (pid {child.proc.pid}, code {child.proc.returncode})")
        if self.redis is not None:
            proc = self.redis.proc
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5.0)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            _say(f"stopped redis-server (pid {proc.pid})")
        if self.redis_dir is not None:
            shutil.rmtree(self.redis_dir, ignore_errors=True)


def _display_host(host: str) -> str:
    return "127.0.0.1" if host in ("", "0.0.0.0", "::", "[::]") else host


def _probe(url: str) -> tuple[bool, str]:
    """(ready, what was seen) for one GET of ``url``."""
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return response.status == 200, f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return False, f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return False, f"not answering ({reason})"


@contextlib.contextmanager
def _signals_to(stack: _Stack) -> Iterator[None]:
    previous = {sig: signal.signal(sig, stack.on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _cmd_up(args: argparse.Namespace) -> int:
    settings = Settings()
    stack = _Stack(grace_s=args.grace)
    with _signals_to(stack):
        try:
            return _up(args, settings, stack)
        except CliError as exc:
            _say(f"error: {exc}")
            return 1
        finally:
            stack.stop()


def _up(args: argparse.Namespace, settings: Settings, stack: _Stack) -> int:
    host = args.host or settings.host
    port = args.port if args.port is not None else settings.port
    model = args.model or settings.model

    if _port_in_use(_display_host(host), port):
        raise CliError(f"something already listens on {host}:{port}: choose another --port")

    if args.embedded_redis or not _redis_answers(settings.redis_url):
        if not args.embedded_redis:
            where = redact_url(settings.redis_url)
            _say(f"no Redis answers at {where}: starting an embedded redis-server")
        redis_url = stack.start_redis()
    else:
        redis_url = settings.redis_url
        _say(f"redis    {redact_url(redis_url)} (already running)")

    env = {
        **os.environ,
        "TOKENBUS_REDIS_URL": redis_url,
        "REDIS_URL": redis_url,
        "PYTHONUNBUFFERED": "1",
    }
    env.update(_worker_env(args))
    if args.model:  # jobs that name no model go to the workers started here
        env["TOKENBUS_DEFAULT_MODEL"] = args.model
    gateway_env = {**env, "TOKENBUS_HOST": host, "TOKENBUS_PORT": str(port)}

    if args.workers and _needs_bundled(settings, args):
        _say(f"preparing {BUNDLED_MODEL} (converted once, then cached)")
        code = subprocess.call(_prepare_argv(False), env=env)
        if code != 0:
            raise CliError(f"preparing {BUNDLED_MODEL} failed (exit code {code})")

    started = time.time()
    stack.spawn("gateway", [sys.executable, "-m", "gateway"], gateway_env)
    for n in range(args.workers):
        stack.spawn(f"worker {n + 1}", [sys.executable, "-m", "workers"], env)

    base = f"http://{_display_host(host)}:{port}"
    if not _wait_ready(stack, f"{base}/readyz", args.ready_timeout):
        return 0  # interrupted while starting: a requested stop
    keys = Keys(settings.key_prefix)
    if args.workers and not _wait_model(stack, redis_url, keys, model, started, args):
        return 0

    public = (settings.public_url or base).rstrip("/")
    ws = "ws" + public[len("http") :] if public.startswith("http") else public
    jobs = keys.jobs_stream(model)
    rows = [
        ("chat page", f"{public}/"),
        ("openai", f"{public}/v1  (chat/completions, completions, models)"),
        ("websocket", f"{ws}/v1/ws"),
        ("sse", f"{public}/v1/sessions/{{id}}/events"),
        ("healthz", f"{public}/healthz"),
        ("readyz", f"{public}/readyz"),
        ("redis", redact_url(redis_url)),
        ("jobs", f"{jobs}  (XADD {jobs} '*' job '<job JSON>')"),
    ]
    for label, value in rows:
        print(f"  {label:<10} {value}", flush=True)
    _say(f"ready: gateway + {args.workers} worker(s) on model {model!r}; Ctrl-C stops everything")

    while not stack.stopping:
        dead = stack.dead_child()
        if dead is not None:
            _say(
                f"error: {dead.name} (pid {dead.proc.pid}) exited with code {dead.proc.returncode}"
            )
            return 1
        time.sleep(0.2)
    _say(f"received {signal.Signals(stack.signals[0]).name}: stopping")
    return 0


def _wait_model(
    stack: _Stack, redis_url: str, keys: Keys, model: str, since: float, args: argparse.Namespace
) -> bool:
    """Wait until a worker started here announces ``model`` (its engine has loaded it)."""
    _say(f"waiting for a worker to load {model!r} ...")
    client = redis.Redis.from_url(redis_url, socket_timeout=2.0)

    def announced() -> tuple[bool, str]:
        try:
            score = client.zscore(keys.models, model)
        except redis.RedisError as exc:
            return False, f"redis: {exc}"
        return score is not None and float(score) >= since, "the engine is still starting"

    try:
        return _poll(stack, announced, what=f"a worker of {model!r}", timeout_s=args.ready_timeout)
    finally:
        client.close()


def _wait_ready(stack: _Stack, url: str, timeout_s: float) -> bool:
    """Poll ``url`` until it answers 200; False when a signal asked us to stop first."""
    _say(f"waiting for {url} ...")
    return _poll(stack, lambda: _probe(url), what=url, timeout_s=timeout_s, report_s=1.0)


def _poll(
    stack: _Stack,
    check: Callable[[], tuple[bool, str]],
    *,
    what: str,
    timeout_s: float,
    report_s: float = 5.0,
) -> bool:
    """Call ``check`` (ready?, status) until ready; False when a signal asked us to stop first.

    A child that dies, or ``timeout_s`` passing, raises CliError; the status is reported every
    ``report_s`` seconds meanwhile.
    """
    start = time.monotonic()
    last_report = start
    while not stack.stopping:
        dead = stack.dead_child()
        if dead is not None:
            raise CliError(
                f"{dead.name} (pid {dead.proc.pid}) exited with code {dead.proc.returncode} "
                f"before {what} was ready"
            )
        ready, seen = check()
        if ready:
            return True
        now = time.monotonic()
        if now - start > timeout_s:
            raise CliError(f"{what} not ready after {timeout_s:.0f}s (last: {seen})")
        if now - last_report >= report_s:
            _say(f"  ... {now - start:.0f}s: {seen}")
            last_report = now
        time.sleep(0.2)
    return False


# ---------------------------------------------------------------------------------------------
# argument parsing


def _add_worker_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", help="engine a worker runs (TOKENBUS_ENGINE)")
    parser.add_argument("--model", help="model served, and jobs stream read (TOKENBUS_MODEL)")
    parser.add_argument(
        "--slots", type=int, help="jobs a worker runs at once (TOKENBUS_WORKER_SLOTS)"
    )


def _add_gateway_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="gateway listen address (TOKENBUS_HOST)")
    parser.add_argument("--port", type=int, help="gateway listen port (TOKENBUS_PORT)")


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenbus",
        description="Token streaming fabric for LLM inference. Settings come from TOKENBUS_* "
        "environment variables (`tokenbus settings` lists them).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser(
        "up",
        help="run Redis (or use the configured one), a gateway and workers",
        description="Run the whole stack in the foreground; Ctrl-C stops everything.",
    )
    _add_gateway_options(up)
    _add_worker_options(up)
    up.add_argument("--workers", type=_non_negative, default=1, help="worker processes (1)")
    up.add_argument(
        "--embedded-redis",
        action="store_true",
        help="always start a private redis-server, even when the configured Redis answers",
    )
    up.add_argument(
        "--ready-timeout",
        type=float,
        default=600.0,
        help="seconds to wait for /readyz, then for the workers' engines (600)",
    )
    up.add_argument(
        "--grace", type=float, default=10.0, help="seconds children get to stop before a kill"
    )
    up.set_defaults(func=_cmd_up)

    gateway = sub.add_parser("gateway", help="run one gateway (python -m gateway)")
    _add_gateway_options(gateway)
    gateway.set_defaults(func=_cmd_gateway)

    worker = sub.add_parser("worker", help="run one worker (python -m workers)")
    _add_worker_options(worker)
    worker.set_defaults(func=_cmd_worker)

    prepare = sub.add_parser(
        "prepare-model",
        help=f"convert the bundled {BUNDLED_MODEL} into the model cache (once; offline)",
    )
    prepare.add_argument("--force", action="store_true", help="convert again even if prepared")
    prepare.set_defaults(func=_cmd_prepare_model)

    schema = sub.add_parser("schema", help="write the JSON Schema of a job")
    schema.add_argument(
        "--out",
        default=str(DEFAULT_SCHEMA_PATH),
        help=f"file, or - for stdout ({DEFAULT_SCHEMA_PATH})",
    )
    schema.set_defaults(func=_cmd_schema)

    enqueue = sub.add_parser("enqueue", help="append a prompt job to a model's jobs stream")
    enqueue.add_argument("--session", required=True, help="session the answer is published on")
    enqueue.add_argument("--prompt", required=True, help="prompt text")
    enqueue.add_argument("--model", help="model (default: TOKENBUS_DEFAULT_MODEL)")
    enqueue.add_argument("--max-tokens", type=int, help="largest answer, in tokens")
    enqueue.add_argument("--job-id", help="job id (default: a new random one)")
    enqueue.add_argument(
        "--on-disconnect", choices=["continue", "cancel"], default="continue", help="(continue)"
    )
    enqueue.add_argument(
        "--encoding", choices=["json", "msgpack"], default="json", help="entry encoding (json)"
    )
    enqueue.set_defaults(func=_cmd_enqueue)

    token = sub.add_parser("token", help="print the token that reads a session (operators only)")
    token.add_argument("session_id", help="a session id, e.g. one another service made up")
    token.set_defaults(func=_cmd_token)

    settings = sub.add_parser("settings", help="print the effective settings")
    settings.add_argument(
        "--markdown", action="store_true", help="print the README's table of every setting"
    )
    settings.set_defaults(func=_cmd_settings)

    from shared.chaos.command import add_parser as add_chaos  # its imports only when needed

    add_chaos(sub)
    from bench.command import add_parser as add_bench

    add_bench(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except CliError as exc:
        print(f"tokenbus: error: {exc}", file=sys.stderr, flush=True)
        return 1
    except ValidationError as exc:  # Settings() with a bad TOKENBUS_* value
        print(f"tokenbus: error: bad settings: {exc}", file=sys.stderr, flush=True)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
