"""schemathesis over /openapi.json, in process against the local engine: positive and negative data,
bounded examples, fixed seed. No request may produce a server error."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from cluster.engine.engine import Engine
from tests.deploy.conftest import client_for

schemathesis = pytest.importorskip("schemathesis")
EXAMPLES = 25


@pytest.mark.slow
def test_no_server_errors_for_any_generated_request(local_engine: Engine) -> None:
    app = client_for(local_engine, default_max_tokens=8).app
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v1/chat/completions", "POST /v1/completions",
                                               "POST /v1/responses", "GET /v1/models", "GET /health"}
    seen: dict[tuple[str, str], set[int]] = {}
    for op in operations:
        # GET routes take no input, so there is no invalid data to generate for them
        modes = ([schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE]
                 if op.method.upper() == "POST" else [schemathesis.GenerationMode.POSITIVE])
        for mode in modes:
            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            def call(case: object) -> None:
                response = case.call()  # type: ignore[attr-defined]
                seen.setdefault((op.label, mode.value), set()).add(response.status_code)
                assert response.status_code < 500, f"{op.label} {mode.value}: {response.text[:300]}"
                ctype = "".join(response.headers.get("content-type", []))  # schemathesis keeps a list per header
                assert ctype.startswith(("application/json", "text/event-stream", "text/plain")), ctype

            call()
    negative = {code for (label, mode), codes in seen.items() if mode == "negative" for code in codes}
    assert negative and all(400 <= code < 500 for code in negative)
    assert 200 in seen[("POST /v1/completions", "positive")]  # valid data did reach the engine
