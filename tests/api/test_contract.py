"""The API contract: /openapi.json documents every route, and the live API keeps to it.

The document is checked against the app's URL map (every route and method, nothing invented), and
schemathesis then runs generated requests (valid and invalid) against the Flask app served over a real HTTP
server in a thread (FreeBilling, the private real Redis, the demo model ready, no workers): no answer may be a
server error, and every answer must match the document (status, content type, headers, body schema).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import requests

from azu.billing.base import FreeBilling
from azu.errors import Unauthorized

HTTP_METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE"}
KEY = "contract-test"
EXAMPLES = 25  # per operation: the whole run stays well under a minute (about 15 s here)


class OneKey(FreeBilling):
    """FreeBilling that knows one key, so that schemathesis can check that routes refuse the others."""

    def authenticate(self, api_key):
        if api_key != KEY:
            raise Unauthorized("unknown or revoked API key")
        return "contract"


def _app(redis_url: str):
    from web import create_app

    return create_app({"REDIS_URL": redis_url, "AZU_BILLING": OneKey(), "RATELIMIT_ENABLED": False})


def test_the_document_lists_every_route_of_the_url_map(redis_url, registry_dir):
    from web.openapi import undocumented

    app = _app(redis_url)
    assert undocumented(app) == []
    doc = app.test_client().get("/openapi.json").get_json()
    assert doc["openapi"].startswith("3.1")
    documented = {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}
    served = set()
    for rule in app.url_map.iter_rules():
        path = rule.rule
        for arg in rule.arguments:
            path = path.replace(f"<{arg}>", f"{{{arg}}}")
            for converter in ("int", "path", "string"):
                path = path.replace(f"<{converter}:{arg}>", f"{{{arg}}}")
        served |= {(m, path) for m in rule.methods & HTTP_METHODS}
    assert documented == served
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert {"200", "201", "202"} & set(op["responses"]), (method, path)
            for status in ("500", "503"):  # every route documents the one error shape
                schema = op["responses"][status]["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/ErrorBody"}
    assert set(doc["components"]["schemas"]["ErrorDetail"]["properties"]) == {"message", "type", "param",
                                                                               "code"}


def test_the_docs_page_is_served_without_a_cdn(redis_url, registry_dir):
    client = _app(redis_url).test_client()
    page = client.get("/docs")
    assert page.status_code == 200 and b"/openapi.json" in page.data
    assert b"http://" not in page.data and b"https://" not in page.data
    for asset in ("swagger-ui.css", "swagger-ui-bundle.js"):
        resp = client.get(f"/docs/{asset}")
        assert resp.status_code == 200 and len(resp.data) > 1000
    assert client.get("/docs/index.html").status_code == 404


@pytest.fixture(scope="module")
def live_api(redis_url, registry_dir) -> Iterator[str]:
    from werkzeug.serving import make_server

    from tests.support.fake_hub import FakeHub

    hub = FakeHub().start()  # an empty hub on loopback: a shard request for a hub id is a 404, not a fetch
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_ENDPOINT", hub.url)

    server = make_server("127.0.0.1", 0, _app(redis_url), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}"
    assert requests.get(url + "/healthz", timeout=10).status_code == 200
    yield url
    server.shutdown()
    thread.join(timeout=10)
    hub.stop()
    mp.undo()


@pytest.mark.slow
def test_the_live_api_keeps_to_its_document(live_api):
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error, positive_data_acceptance

    def no_server_error(ctx, response, case) -> None:
        # Without a ledger the account routes answer 503 (with Retry-After, documented): that is the one
        # 5xx allowed here. schemathesis' own check counts every 5xx.
        if response.status_code >= 500 and response.status_code != 503:
            raise AssertionError(f"{case.method} {case.formatted_path} answered {response.status_code}: "
                                 f"{response.text[:500]}")
        if response.status_code == 503:
            headers = {k.lower(): v[0] if isinstance(v, list) else v for k, v in response.headers.items()}
            assert int(headers["retry-after"]) >= 1, f"{case.method} {case.formatted_path}: no Retry-After"

    schema = schemathesis.openapi.from_url(live_api + "/openapi.json")
    failures: dict[str, str] = {}
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                  derandomize=True, database=None)
        def run(case) -> None:
            case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"}, timeout=30,
                                   # rules beyond JSON Schema (max_tokens or est_tokens; an address the
                                   # chain accepts) answer a documented 400 to schema-valid bodies
                                   excluded_checks=[not_a_server_error, positive_data_acceptance],
                                   additional_checks=[no_server_error])

        try:
            run()
        except Exception as exc:  # every operation is run; the failures are reported together
            failures[operation.label] = f"{type(exc).__name__}: {exc}"[:3000]
    assert operations >= 20
    assert not failures, "\n\n".join(f"{label}\n{text}" for label, text in failures.items())
