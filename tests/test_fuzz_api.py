"""schemathesis against the OpenAPI document the gateway serves (``GET /openapi.json``).

Every operation gets valid and invalid requests generated from the document (bodies from the
pydantic models), sent over a real socket to a gateway with a worker behind it. What must hold:
no status >= 500, every status and content type the one the document declares, every JSON
answer in its declared shape, and no error logged by the processes under test.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis.errors import Unsatisfiable
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from shared.settings import Settings
from tests.conftest import report
from tests.fuzzing import FUZZ_HEALTH_CHECKS, BackgroundStack, fuzz_settings, watch_errors

#: Examples per operation and generation mode (16 operations: schemathesis leaves out the
#: document's own route; most have both modes).
EXAMPLES = 8
#: An SSE answer never ends by itself: schemathesis reads it for this long, then judges it.
STREAM_READ_S = 0.3
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.fixture
def background(settings: Settings) -> Iterator[BackgroundStack]:
    with BackgroundStack(settings.model_copy(update={"max_tokens_limit": 64})) as stack:
        yield stack


def test_openapi_document_lists_every_documented_route(background: BackgroundStack) -> None:
    document = requests.get(f"{background.base}/openapi.json", timeout=10).json()
    assert document["openapi"].startswith("3.1")
    routes = {(method.upper(), path) for path, ops in document["paths"].items() for method in ops}
    assert routes == {
        ("POST", "/v1/sessions"),
        ("POST", "/v1/sessions/{session_id}/jobs"),
        ("GET", "/v1/sessions/{session_id}/jobs/{job_id}"),
        ("DELETE", "/v1/sessions/{session_id}/jobs/{job_id}"),
        ("GET", "/v1/sessions/{session_id}/events"),
        ("GET", "/v1/sessions/{session_id}/messages"),
        ("DELETE", "/v1/sessions/{session_id}/messages"),
        ("GET", "/v1/ws"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
        ("GET", "/v1/models"),
        ("GET", "/v1/models/{model}"),
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/metrics"),
        ("GET", "/"),
        ("GET", "/openapi.json"),
    }
    # Request bodies are the models that validate them.
    schemas = document["components"]["schemas"]
    assert {"prompt", "messages", "max_tokens", "stop"} <= set(
        schemas["PromptRequest"]["properties"]
    )
    assert "messages" in schemas["ChatCompletionRequest"]["required"]


def test_schemathesis_finds_no_server_error(background: BackgroundStack) -> None:
    schema = schemathesis.openapi.from_url(f"{background.base}/openapi.json")
    session_id = background.session["session_id"]
    token_header = {"Authorization": f"Bearer {background.session['token']}"}
    http = requests.Session()
    statuses: dict[int, int] = {}
    calls = 0

    def call(case: Case[Any]) -> None:
        nonlocal calls
        calls += 1
        path = case.operation.path
        stream = path.endswith("/events") or path.endswith("completions")
        response = case.call(
            base_url=background.base,
            session=http,
            # A WebSocket route answered over plain HTTP is a 400, as documented.
            headers=token_header if "{session_id}" in path else None,
            timeout=STREAM_READ_S if stream else 10,
        )
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        case.validate_response(response, checks=CHECKS)

    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result  # the document itself must be valid
        operations.append(result.ok())
    unnegatable: list[str] = []
    with watch_errors() as errors:
        for operation in operations:
            fixed: dict[str, Any] = {}
            if "{session_id}" in operation.path:
                fixed["path_parameters"] = {"session_id": session_id}
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                strategy = operation.as_strategy(generation_mode=mode, **fixed)

                # An operation with nothing to make invalid filters out every negative case.
                @hypothesis_settings(
                    fuzz_settings(EXAMPLES),
                    suppress_health_check=[*FUZZ_HEALTH_CHECKS, HealthCheck.filter_too_much],
                )
                @given(case=strategy)
                def check(case: Case[Any]) -> None:
                    call(case)

                try:
                    check()
                except Unsatisfiable:
                    # Nothing of it can be made invalid: no body, no constrained parameter.
                    assert mode is GenerationMode.NEGATIVE, operation.label
                    unnegatable.append(operation.label)
        assert background.alive()
    assert errors.summary() == []
    report(
        f"schemathesis: {calls} requests over {len(operations)} operations, "
        f"by status {sorted(statuses.items())}; nothing to make invalid in {len(unnegatable)}"
    )
    assert not any(status >= 500 for status in statuses)
