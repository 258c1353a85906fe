"""The web chat page at ``/``, driven in headless Chromium (Debian's, through Playwright).

The page speaks the WebSocket protocol to a real stack; what it shows is checked against what
the worker published (the job's text in Redis), so a lost or repeated delta fails the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pytest
from redis.asyncio import Redis

from shared.close_codes import CLOSE_DRAINING
from shared.codec import text
from shared.embedded_redis import free_port
from shared.jobs import get_record
from shared.keys import Keys
from shared.settings import Settings
from shared.stream.position import HISTORY_FIELD
from tests.conftest import report
from tests.servers import running_worker, settings_env, stack, wait_ready

if TYPE_CHECKING:
    from playwright.async_api import Browser, Locator, Page

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "build" / "screenshots"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: Bounds on every wait (milliseconds); generous, never asserted as timings.
WAIT_MS = 30_000
ANSWER_MS = 60_000

ASSISTANT = '[data-testid="message"][data-role="assistant"]'
MESSAGE = '[data-testid="message"]'


def _unavailable(reason: str) -> None:
    """In CI the browser test must run; elsewhere a missing browser skips it."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this test must run: `make setup` installs it)")
    pytest.skip(reason)


@pytest.fixture
def chromium() -> Path:
    if not CHROMIUM.exists():
        _unavailable(f"{CHROMIUM} is missing (Debian's chromium package; `make setup`)")
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        _unavailable("the playwright package is missing (the dev extra)")
    return CHROMIUM


@pytest.fixture
async def browser(chromium: Path) -> AsyncIterator[Browser]:
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        # A fresh temporary profile per launch: no state leaks between tests.
        browser = await pw.chromium.launch(
            executable_path=str(chromium), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            await browser.close()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    context = await browser.new_context(viewport={"width": 1024, "height": 720})
    page = await context.new_page()
    page.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield page
    finally:
        await context.close()
    assert errors == [], f"uncaught errors in the page: {errors}"


@pytest.fixture
def slow(settings: Settings) -> Settings:
    """Answers slow enough to watch, stop and interrupt."""
    return settings.model_copy(
        update={"synthetic_tokens_per_s": 15.0, "synthetic_tokens": 300, "batch_window_ms": 0.0}
    )


# ---- helpers ------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def chat_stack(settings: Settings, page: Page) -> AsyncIterator[str]:
    """``stack(settings)``; the page leaves before it stops (an open WebSocket would hold the
    gateway's shutdown for its whole grace period, and the page would keep reconnecting)."""
    async with stack(settings) as (base, _):
        try:
            yield base
        finally:
            await page.goto("about:blank")


async def open_chat(page: Page, base: str) -> None:
    from playwright.async_api import expect

    await page.goto(f"{base}/")
    await expect(page.get_by_test_id("status")).to_have_attribute("data-status", "connected")


async def send_prompt(page: Page, text: str) -> Locator:
    """Type ``text`` and press Enter; the new answer's bubble."""
    from playwright.async_api import expect

    before = await page.locator(ASSISTANT).count()
    box = page.get_by_test_id("prompt")
    await box.fill(text)
    await box.press("Enter")
    answer = page.locator(ASSISTANT).nth(before)
    await expect(answer).to_be_attached()
    return answer


async def answer_text(answer: Locator) -> str:
    content: str = await answer.get_by_test_id("message-text").evaluate("e => e.textContent")
    return content


async def wait_longer_than(page: Page, answer: Locator, n: int) -> str:
    """Wait until the answer's text is longer than ``n`` characters; return it."""
    handle = await answer.get_by_test_id("message-text").element_handle()
    await page.wait_for_function("([e, n]) => e.textContent.length > n", arg=[handle, n])
    return await answer_text(answer)


async def session_id(page: Page) -> str:
    sid: str = await page.evaluate("() => window.tokenbus.sessionId")
    return sid


async def published_text(redis: Redis, keys: Keys, sid: str, job_id: str) -> str:
    raw = await redis.get(keys.job_text(sid, job_id))
    assert raw is not None, "the worker published no text for this job"
    return text(raw)


async def wait_record_state(redis: Redis, keys: Keys, job_id: str, state: str) -> dict[str, str]:
    deadline = time.monotonic() + WAIT_MS / 1000
    while True:
        record = await get_record(redis, keys, job_id)
        if record.get("state") == state or time.monotonic() > deadline:
            return record
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def gateway_on_port(settings: Settings, port: int) -> AsyncIterator[subprocess.Popen[bytes]]:
    """``python -m gateway`` on a given port (so a restarted one is found at the same URL)."""
    env = settings_env(settings)
    env["TOKENBUS_HOST"] = "127.0.0.1"
    env["TOKENBUS_PORT"] = str(port)
    proc = subprocess.Popen([sys.executable, "-m", "gateway"], env=env)
    try:
        await wait_ready(f"http://127.0.0.1:{port}/readyz", proc)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        await asyncio.to_thread(proc.wait, 15)


# ---- the page as files --------------------------------------------------------------------


async def test_page_and_assets_are_served_uncached_with_their_types(settings: Settings) -> None:
    async with stack(settings) as (base, http):
        want = {
            "/": "text/html",
            "/static/app.js": "text/javascript",
            "/static/style.css": "text/css",
        }
        for path, content_type in want.items():
            async with http.get(f"{base}{path}") as response:
                assert response.status == 200, path
                assert response.content_type == content_type
                assert response.headers["Cache-Control"] == "no-cache"
                assert response.headers["X-Content-Type-Options"] == "nosniff"
                etag = response.headers["ETag"]
                body = await response.text()
            if path == "/":
                assert 'data-testid="prompt"' in body and "/static/app.js" in body
            async with http.get(f"{base}{path}", headers={"If-None-Match": etag}) as again:
                assert again.status == 304
        for missing in ("/static/index.html", "/static/nope.js", "/static/..%2Fapp.py"):
            async with http.get(f"{base}{missing}") as response:
                assert response.status == 404, missing


# ---- the page in a browser ----------------------------------------------------------------


async def test_answer_streams_and_stop_cancels_the_job(
    slow: Settings, redis: Redis, keys: Keys, page: Page
) -> None:
    from playwright.async_api import expect

    async with chat_stack(slow, page) as base:
        await open_chat(page, base)
        await expect(page.get_by_test_id("stop")).to_be_disabled()
        answer = await send_prompt(page, "Tell me a long story,\nplease.")
        user = page.locator('[data-testid="message"][data-role="user"]').last
        assert await answer_text(user) == "Tell me a long story,\nplease."

        await expect(answer).to_have_attribute("data-state", "streaming")
        first = await wait_longer_than(page, answer, 0)
        second = await wait_longer_than(page, answer, max(len(first), 80))
        assert second.startswith(first)  # it grows, and only at its end
        await expect(page.get_by_test_id("send")).to_be_disabled()

        stop = page.get_by_test_id("stop")
        await expect(stop).to_be_enabled()
        await stop.click()
        await expect(answer).to_have_attribute("data-state", "stopped")
        await expect(answer.get_by_test_id("message-meta")).to_contain_text("stopped")
        await expect(stop).to_be_disabled()

        sid = await session_id(page)
        job_id = await answer.get_attribute("data-job-id")
        assert job_id
        record = await wait_record_state(redis, keys, job_id, "cancelled")
        assert record.get("state") == "cancelled", record
        # The answer stopped growing: it is exactly what the worker published before it stopped.
        stopped = await answer_text(answer)
        assert stopped == await published_text(redis, keys, sid, job_id)
        assert 0 < len(stopped.split()) < slow.synthetic_tokens
        await page.get_by_test_id("prompt").fill("Thanks! Another one?")
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shot = SCREENSHOTS / "web-chat.png"
        await page.screenshot(path=str(shot))
        assert await answer_text(answer) == stopped
    report(f"web chat screenshot: {shot.relative_to(ROOT)}")


async def test_gateway_restart_mid_answer_resumes_without_loss_or_repeat(
    settings: Settings, redis: Redis, keys: Keys, page: Page
) -> None:
    from playwright.async_api import expect

    n_tokens = 150
    settings = settings.model_copy(
        update={"synthetic_tokens_per_s": 20.0, "synthetic_tokens": n_tokens}
    )
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    async with running_worker(settings):
        async with gateway_on_port(settings, port) as first_gateway:
            await open_chat(page, base)
            answer = await send_prompt(page, "Keep going while the gateway restarts.")
            await expect(answer).to_have_attribute("data-state", "streaming")
            await wait_longer_than(page, answer, 20)
            first_gateway.kill()  # a crash: no goodbye to the browser
            await asyncio.to_thread(first_gateway.wait, 15)
        status = page.get_by_test_id("status")
        await expect(status).to_have_attribute("data-status", "reconnecting")
        async with gateway_on_port(settings, port):
            await expect(status).to_have_attribute("data-status", "connected")
            await expect(answer).to_have_attribute("data-state", "done", timeout=ANSWER_MS)
            sid = await session_id(page)
            job_id = await answer.get_attribute("data-job-id")
            assert job_id
            shown = await answer_text(answer)
            assert shown == await published_text(redis, keys, sid, job_id)
            assert len(shown.split()) == n_tokens  # whitespace-free words: none lost or doubled
            reconnects: int = await page.evaluate("() => window.tokenbusReconnects")
            statuses: list[str] = await page.evaluate("() => window.tokenbusStatusLog")
            await page.goto("about:blank")
    assert reconnects >= 1
    assert "reconnecting" in statuses


async def test_gateway_drain_mid_answer_reconnects_at_once_without_loss_or_repeat(
    settings: Settings, redis: Redis, keys: Keys, page: Page
) -> None:
    """SIGTERM: the gateway closes the page's socket with 1012 and exits 0; the page reconnects
    at once (the replacement takes the port) and resumes from its offset."""
    from playwright.async_api import expect

    n_tokens = 150
    settings = settings.model_copy(
        update={"synthetic_tokens_per_s": 20.0, "synthetic_tokens": n_tokens}
    )
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    async with running_worker(settings):
        async with gateway_on_port(settings, port) as first_gateway:
            await open_chat(page, base)
            answer = await send_prompt(page, "Keep going while the gateway drains.")
            await expect(answer).to_have_attribute("data-state", "streaming")
            await wait_longer_than(page, answer, 20)
            first_gateway.terminate()  # SIGTERM: a graceful drain
            assert await asyncio.to_thread(first_gateway.wait, 30) == 0
        async with gateway_on_port(settings, port):
            await expect(page.get_by_test_id("status")).to_have_attribute(
                "data-status", "connected"
            )
            await expect(answer).to_have_attribute("data-state", "done", timeout=ANSWER_MS)
            sid = await session_id(page)
            job_id = await answer.get_attribute("data-job-id")
            assert job_id
            shown = await answer_text(answer)
            assert shown == await published_text(redis, keys, sid, job_id)
            assert len(shown.split()) == n_tokens  # whitespace-free words: none lost or doubled
            codes: list[int] = await page.evaluate("() => window.tokenbusCloseCodes")
            at_once: int = await page.evaluate("() => window.tokenbusDrainReconnects")
            await page.goto("about:blank")
    assert codes[0] == CLOSE_DRAINING  # told to go elsewhere, not cut off
    assert at_once == 1  # and it went without waiting out a backoff


async def test_reload_mid_answer_resumes_from_the_saved_offset(
    slow: Settings, redis: Redis, keys: Keys, page: Page
) -> None:
    from playwright.async_api import expect

    settings = slow.model_copy(update={"synthetic_tokens_per_s": 30.0, "synthetic_tokens": 90})
    async with chat_stack(settings, page) as base:
        await open_chat(page, base)
        answer = await send_prompt(page, "Survive a reload.")
        await wait_longer_than(page, answer, 20)
        sid = await session_id(page)
        job_id = await answer.get_attribute("data-job-id")
        assert job_id
        await page.reload()
        await expect(page.get_by_test_id("status")).to_have_attribute("data-status", "connected")
        assert await session_id(page) == sid
        answer = page.locator(f'{ASSISTANT}[data-job-id="{job_id}"]')
        await expect(answer).to_have_attribute("data-state", "done", timeout=ANSWER_MS)
        shown = await answer_text(answer)
        assert shown == await published_text(redis, keys, sid, job_id)
        assert len(shown.split()) == 90
        assert await page.locator(MESSAGE).count() == 2  # the prompt and its answer, once


async def test_new_conversation_starts_a_new_session_with_an_empty_transcript(
    settings: Settings, page: Page
) -> None:
    from playwright.async_api import expect

    async with chat_stack(settings, page) as base:
        await open_chat(page, base)
        first = await session_id(page)
        answer = await send_prompt(page, "Hello")
        await expect(answer).to_have_attribute("data-state", "done")
        assert await page.locator(MESSAGE).count() == 2

        await page.get_by_test_id("new-conversation").click()
        await page.wait_for_function(
            "sid => window.tokenbus.sessionId && window.tokenbus.sessionId !== sid", arg=first
        )
        await expect(page.get_by_test_id("status")).to_have_attribute("data-status", "connected")
        second = await session_id(page)
        assert second.startswith("s_") and second != first
        await expect(page.locator(MESSAGE)).to_have_count(0)
        await expect(page.get_by_test_id("empty")).to_be_visible()
        stored: dict[str, Any] = await page.evaluate(
            "() => JSON.parse(localStorage.getItem('tokenbus.chat.v1'))"
        )
        assert stored["session"]["session_id"] == second and stored["items"] == []

        # The new session works, and a reload keeps it.
        answer = await send_prompt(page, "Hello again")
        await expect(answer).to_have_attribute("data-state", "done")
        await page.reload()
        await expect(page.get_by_test_id("status")).to_have_attribute("data-status", "connected")
        assert await session_id(page) == second
        await expect(page.locator(MESSAGE)).to_have_count(2)


async def test_api_key_is_asked_for_when_session_creation_is_refused(
    settings: Settings, page: Page
) -> None:
    """A gateway with API keys answers 401 to POST /v1/sessions without one of them."""
    from playwright.async_api import expect

    keyed = settings.model_copy(update={"api_keys": "k-good, k-other"})
    async with chat_stack(keyed, page) as base:
        await page.goto(f"{base}/")
        status = page.get_by_test_id("status")
        await expect(status).to_have_attribute("data-status", "needs-key")
        form = page.get_by_test_id("apikey-form")
        await expect(form).to_be_visible()
        await page.get_by_test_id("apikey-input").fill("k-bad")
        await page.get_by_test_id("apikey-save").click()
        await expect(page.get_by_test_id("apikey-error")).to_contain_text("not accepted")
        await page.get_by_test_id("apikey-input").fill("k-good")
        await page.get_by_test_id("apikey-save").click()
        await expect(status).to_have_attribute("data-status", "connected")
        await expect(form).to_be_hidden()
        assert await page.evaluate("() => localStorage.getItem('tokenbus.apiKey')") == "k-good"
        answer = await send_prompt(page, "Hello with a key")
        await expect(answer).to_have_attribute("data-state", "done")


async def test_unknown_session_token_starts_a_new_session(settings: Settings, page: Page) -> None:
    """A stored session the gateway refuses (4401) is replaced, and the old text stays shown."""
    from playwright.async_api import expect

    async with chat_stack(settings, page) as base:
        await page.goto(f"{base}/healthz")  # the page's origin, for its localStorage
        forged = {
            "v": 1,
            "session": {"session_id": "s_forged", "token": "nope", "ws_url": ""},
            "epoch": None,
            "offset": 0,
            "seq": 1,
            "items": [{"id": 1, "role": "user", "text": "from before", "state": "done"}],
        }
        await page.evaluate(
            "s => localStorage.setItem('tokenbus.chat.v1', JSON.stringify(s))", forged
        )
        await open_chat(page, base)
        sid = await session_id(page)
        assert sid != "s_forged"
        await expect(page.get_by_test_id("notice")).to_contain_text("new one started")
        await expect(page.locator(MESSAGE)).to_have_count(1)
        answer = await send_prompt(page, "Still works")
        await expect(answer).to_have_attribute("data-state", "done")


# ---- idempotency keys ---------------------------------------------------------------------


def prompts_in(frames: list[str | bytes]) -> list[dict[str, Any]]:
    """The ``prompt`` messages among WebSocket frames."""
    found = []
    for frame in frames:
        message = json.loads(frame)
        if isinstance(message, dict) and message.get("type") == "prompt":
            found.append(message)
    return found


async def test_each_prompt_carries_a_fresh_idempotency_key(
    settings: Settings, redis: Redis, keys: Keys, page: Page
) -> None:
    from playwright.async_api import WebSocket, expect

    sent: list[str | bytes] = []

    def on_frame(payload: str | bytes) -> None:
        sent.append(payload)

    def on_websocket(ws: WebSocket) -> None:
        ws.on("framesent", on_frame)

    page.on("websocket", on_websocket)
    async with chat_stack(settings, page) as base:
        await open_chat(page, base)
        for text_ in ("First question", "Second question"):
            answer = await send_prompt(page, text_)
            await expect(answer).to_have_attribute("data-state", "done")
        prompts = prompts_in(sent)
        assert [p["messages"][0]["content"] for p in prompts] == [
            "First question",
            "Second question",
        ]
        keys_sent = [p["idempotency_key"] for p in prompts]
        assert all(isinstance(k, str) and len(k) >= 16 for k in keys_sent), keys_sent
        assert keys_sent[0] != keys_sent[1]
        assert await redis.xlen(keys.jobs_stream(settings.model)) == 2


async def test_a_prompt_whose_confirmation_is_lost_is_sent_again_and_answered_once(
    settings: Settings, redis: Redis, keys: Keys, page: Page
) -> None:
    """The gateway gets the prompt and enqueues its job, but the socket drops before the page
    hears so: on the next connection the page sends it again with the same key, and the gateway
    answers with the same job instead of making a second one."""
    from playwright.async_api import WebSocketRoute, expect

    sent: list[dict[str, Any]] = []  # prompts, on every connection
    replies: list[list[dict[str, Any]]] = []  # what the gateway said, per connection
    cut: list[int] = []  # codes the page's first socket was closed with

    async def route(ws: WebSocketRoute) -> None:
        server = ws.connect_to_server()
        heard: list[dict[str, Any]] = []
        replies.append(heard)
        first = len(replies) == 1
        prompted = False

        def to_server(message: str | bytes) -> None:
            nonlocal prompted
            decoded = json.loads(message)
            if decoded.get("type") == "prompt":
                sent.append(decoded)
                prompted = True
            server.send(message)

        async def to_page(message: str | bytes) -> None:
            decoded = json.loads(message)
            heard.append(decoded)
            if not (first and prompted):
                ws.send(message)
            elif decoded.get("type") == "queued" and not cut:
                # The gateway enqueued the job and said so; the page never hears it.
                cut.append(1011)
                await ws.close(code=1011, reason="lost")

        ws.on_message(to_server)
        server.on_message(to_page)

    await page.route_web_socket(re.compile(r"/v1/ws"), route)
    async with chat_stack(settings, page) as base:
        await open_chat(page, base)
        answer = await send_prompt(page, "Answer me once")
        await expect(answer).to_have_attribute("data-state", "done", timeout=ANSWER_MS)
        sid = await session_id(page)
        job_id = await answer.get_attribute("data-job-id")
        assert job_id

        assert cut == [1011] and len(replies) >= 2
        queued = [m for m in replies[0] if m.get("type") == "queued"]
        assert [m["job_id"] for m in queued] == [job_id] and "replayed" not in queued[0]
        # Sent twice, on two connections, with one key: the second was a replay.
        assert len(sent) == 2 and sent[0] == sent[1]
        assert sent[0]["idempotency_key"]
        again = [m for c in replies[1:] for m in c if m.get("type") == "queued"]
        assert [(m["job_id"], m.get("replayed")) for m in again] == [(job_id, True)]
        # One job, one answer, shown once.
        assert await redis.xlen(keys.jobs_stream(settings.model)) == 1
        entries = cast(
            list[tuple[bytes, dict[bytes, bytes]]], await redis.xrange(keys.session_history(sid))
        )
        history = [json.loads(fields[HISTORY_FIELD.encode()]) for _, fields in entries]
        assert [e["job_id"] for e in history if e["type"] == "stream_start"] == [job_id]
        shown = await answer_text(answer)
        assert shown == await published_text(redis, keys, sid, job_id)
        assert len(shown.split()) == settings.synthetic_tokens
        await expect(page.locator(MESSAGE)).to_have_count(2)
        # Saved (a moment later: saves are batched) with its job and without a prompt to resend.
        await page.wait_for_function(
            """id => {
                const items = JSON.parse(localStorage.getItem('tokenbus.chat.v1')).items;
                return items.length === 2 && items[1].job_id === id && !items[1].submit;
            }""",
            arg=job_id,
        )
