"""gunicorn's own refusals (before Flask sees the request) come in the API's one JSON error shape."""

from __future__ import annotations

import json
import socket
import subprocess

import pytest

from tests.support import REPO, wait_for

pytestmark = pytest.mark.slow  # starts a real gunicorn


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _raw(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


@pytest.fixture(scope="module")
def server():
    from azu.cli.processes import gunicorn_argv

    port = _free_port()
    argv = gunicorn_argv("web:create_app()", host="127.0.0.1", port=port, workers=1, threads=2)
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def up() -> bool:
        try:
            return _raw(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")[0] == 200
        except OSError:
            return False

    try:
        wait_for(up, timeout=60, interval=0.1)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=15)


@pytest.mark.parametrize(("request_bytes", "status", "code"), [
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "uri_too_long"),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n", 431,
     "request_header_fields_too_large"),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + b"\r\n",
     431, "request_header_fields_too_large"),
    (b"BR@KEN / HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request"),
], ids=["long-url", "big-header", "many-headers", "bad-method"])
def test_server_level_refusals_are_json(server: int, request_bytes: bytes, status: int, code: str) -> None:
    got, headers, body = _raw(server, request_bytes)
    assert got == status
    assert headers["Content-Type"] == "application/json"
    error = json.loads(body)["error"]
    assert error["code"] == code and error["message"] and set(error) == {"message", "type", "param", "code"}
