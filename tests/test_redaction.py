"""Secrets never reach a terminal or a log: ``tokenbus settings`` and the gateway's start log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from shared.embedded_redis import free_port
from shared.settings import Settings, redact_url
from tests.servers import settings_env, wait_ready

ROOT = Path(__file__).resolve().parent.parent

PASSWORD = "hunter2-redis"
SECRET = "sign-with-this"
API_KEYS = "sk-first,sk-second"


def _cli_env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENBUS_")}
    env.pop("REDIS_URL", None)
    return {**env, **settings}


def test_redact_url_hides_every_password_form() -> None:
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert redact_url(f"redis://:{PASSWORD}@h:1/0") == "redis://:***@h:1/0"
    assert redact_url(f"rediss://app:{PASSWORD}@h/2") == "rediss://app:***@h/2"
    assert redact_url(f"redis://h/0?db=1&password={PASSWORD}") == "redis://h/0?db=1&password=***"
    assert redact_url(f"unix:///run/r.sock?password={PASSWORD}") == (
        "unix:///run/r.sock?password=***"
    )


def test_tokenbus_settings_prints_no_secret() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "shared.cli", "settings"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        cwd=ROOT,
        env=_cli_env(
            TOKENBUS_REDIS_URL=f"redis://app:{PASSWORD}@redis.internal:6379/0",
            TOKENBUS_SECRET=SECRET,
            TOKENBUS_API_KEYS=API_KEYS,
        ),
    )
    lines = done.stdout.splitlines()
    for secret in (PASSWORD, SECRET, "sk-first", "sk-second"):
        assert secret not in done.stdout
    assert "TOKENBUS_REDIS_URL=redis://app:***@redis.internal:6379/0" in lines
    assert "TOKENBUS_SECRET=***" in lines
    assert "TOKENBUS_API_KEYS=***" in lines
    # Everything else is shown as it is.
    assert f"TOKENBUS_HISTORY_TTL_S={Settings.model_fields['history_ttl_s'].default}" in lines


async def test_the_gateway_logs_its_redis_url_without_the_password(redis_url: str) -> None:
    # Redis's default user has no password: AUTH with any one succeeds, so the URL is usable.
    url = redis_url.replace("redis://", f"redis://default:{PASSWORD}@", 1)
    settings = Settings(redis_url=url, key_prefix="tbt-redaction", api_keys=API_KEYS)
    env = settings_env(settings)
    port = free_port()
    env["TOKENBUS_PORT"] = str(port)
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway"], env=env, stderr=subprocess.PIPE, cwd=ROOT
    )
    try:
        await wait_ready(f"http://127.0.0.1:{port}/readyz", proc)
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=30)
    log = stderr.decode()
    assert PASSWORD not in log and "sk-first" not in log
    ready = [json.loads(line) for line in log.splitlines() if '"gateway_ready"' in line]
    assert len(ready) == 1
    assert ready[0]["redis"] == redact_url(url) == url.replace(PASSWORD, "***")
