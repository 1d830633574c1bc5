"""The gunicorn worker the API and the registry run under: gthread, with errors in the API's one shape.

gunicorn answers a request it cannot parse (a request line over ``limit_request_line``: 414; headers
over ``limit_request_fields`` / ``limit_request_field_size``: 431; a malformed request: 400) before the app
sees it, with an HTML page. Its limits stay on (they bound what a client can make a worker read), and this
worker writes those answers as the same JSON error object every route answers with.
"""

from __future__ import annotations

import json
import socket
from typing import Any

from gunicorn import util
from gunicorn.workers.gthread import ThreadWorker

from web.errors import openai_error_body

_CODES = {400: "bad_request", 403: "forbidden", 414: "uri_too_long", 417: "expectation_failed",
          431: "request_header_fields_too_large", 500: "internal_error", 501: "not_implemented"}


def write_json_error(sock: socket.socket, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn's ``util.write_error`` with the API's JSON error body instead of an HTML page."""
    message = f"{reason}: {mesg}" if mesg else reason
    body = json.dumps(openai_error_body(status_int, message, code=_CODES.get(status_int))).encode()
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode("latin1")
    util.write_nonblock(sock, head + body)


class JsonErrorsWorker(ThreadWorker):
    def init_process(self) -> Any:
        # gunicorn's handle_error looks write_error up on its util module at call time.
        util.write_error = write_json_error
        return super().init_process()
