"""Every route of the HTTP API with generated input: never a 5xx, always a JSON error.

Schemathesis generates requests (valid and invalid) from the server's own
OpenAPI document, so a route added later is walked too.
"""

from __future__ import annotations

import itertools

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable


@pytest.fixture(scope="module")
def fuzz_token(services) -> str:
    """A user with a few files and a folder, so that some generated ids exist."""
    dep = services.deployments["local"]
    token = dep.new_user()
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=dep.http + "/api/v1", headers=headers) as c:
        c.post("/folders", json={"path": "/dir"}).raise_for_status()
        for i in range(3):
            c.post("/files", files={"file": (f"f{i}", b"x" * i)}).raise_for_status()
    return token


def test_no_route_answers_5xx(services, fuzz_token):
    """40 valid and 40 invalid requests per operation, each answered below 500 (JSON)."""
    schema = schemathesis.openapi.from_url(
        services.deployments["local"].http + "/api/v1/openapi.json")
    headers = {"Authorization": f"Bearer {fuzz_token}"}
    operations = [op.ok() for op in schema.get_all_operations()]
    assert len(operations) >= 12
    for op, mode in itertools.product(operations, schemathesis.GenerationMode):
        @given(op.as_strategy(mode))
        @settings(max_examples=40, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case) -> None:
            response = case.call(headers={**headers, **(case.headers or {})}, timeout=30)
            assert response.status_code < 500, (case.method, case.path, response.text)
            if response.status_code >= 400:
                assert set(response.json()["error"]) >= {"code", "message"}

        try:
            check()
        except Unsatisfiable:
            # Some operations have no invalid input schemathesis can make (a
            # raw body of any bytes is valid); valid input must always be made.
            assert mode is schemathesis.GenerationMode.NEGATIVE, (op.path, op.method)


def test_openapi_document_names_every_route(services):
    doc = httpx.get(services.deployments["local"].http + "/api/v1/openapi.json").json()
    assert {"/api/v1/files", "/api/v1/files/{id}", "/api/v1/files/{id}/content",
            "/api/v1/files/{id}/versions", "/api/v1/files/{id}/restore", "/api/v1/folders",
            "/api/v1/sync", "/api/v1/sync/longpoll"} <= set(doc["paths"])
