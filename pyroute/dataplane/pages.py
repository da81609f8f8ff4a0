"""The responses pyroute answers itself (no route, upstream down, bad request, ...).

Bodies carry the line Docker Flow Proxy's own error pages show ("Docker Flow Proxy: 503
Service Unavailable") and HAProxy's messages, which is what DFP users see and what their
monitoring may grep for; the page loads nothing from elsewhere. Each response is encoded
once and reused.
ERROR_PAGES_DIR may replace any of them (``use_directory``): ``<code>.http`` is a whole
response as in DFP's /errorfiles (its body and Content-Type are kept; pyroute sets the
framing and Connection), ``<code>.html`` is a body.
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache

log = logging.getLogger("pyroute.dataplane.pages")

PAGES = {
    400: ("Bad Request", "Your browser sent an invalid request."),
    403: ("Forbidden", "Request forbidden by administrative rules."),
    405: ("Method Not Allowed", "A request was made of a resource using a request method not supported by that resource."),
    408: ("Request Time-out", "Your browser didn't send a complete request in time."),
    413: ("Payload Too Large", "The request entity is larger than this proxy accepts."),
    414: ("URI Too Long", "The request URI is longer than this proxy accepts."),
    429: ("Too Many Requests", "You have sent too many requests in a given amount of time."),
    431: ("Request Header Fields Too Large", "The request headers are larger than this proxy accepts."),
    500: ("Internal Server Error", "An internal server error occurred."),
    502: ("Bad Gateway", "The server returned an invalid or incomplete response."),
    503: ("Service Unavailable", "No server is available to handle this request."),
    504: ("Gateway Time-out", "The server didn't respond in time."),
}


_custom: dict[int, tuple[bytes, bytes]] = {}  # status -> (content type, body) from ERROR_PAGES_DIR


def _read_page(path: str) -> tuple[bytes, bytes]:
    with open(path, "rb") as fh:
        data = fh.read()
    if not path.endswith(".http"):
        return b"text/html", data
    head, sep, body = data.replace(b"\r\n", b"\n").partition(b"\n\n")
    if not sep or not head.startswith(b"HTTP/"):
        raise ValueError("not an HTTP response (status line, headers, blank line, body)")
    content_type = b"text/html"
    for line in head.split(b"\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-type" and value.strip():
            content_type = value.strip()
    return content_type, body


def use_directory(directory: str) -> None:
    """Load replacement pages from `directory` ("" = the built-in pages only).

    A file that cannot be read or parsed is logged and the built-in page stays.
    """
    pages: dict[int, tuple[bytes, bytes]] = {}
    for status in PAGES:
        for suffix in (".http", ".html"):
            path = os.path.join(directory, f"{status}{suffix}") if directory else ""
            if not path or not os.path.isfile(path):
                continue
            try:
                pages[status] = _read_page(path)
            except (OSError, ValueError) as exc:
                log.error("error page %s ignored: %s", path, exc)
            break
    _custom.clear()
    _custom.update(pages)
    error_response.cache_clear()
    error_head_only.cache_clear()


@lru_cache(maxsize=None)
def error_response(status: int, close: bool) -> bytes:
    """A complete HTTP/1.1 response for `status`; `close` adds Connection: close."""
    title, message = PAGES[status]
    content_type, body = _custom.get(status) or (
        b"text/html",
        f"<html><head><title>{status} {title}</title></head><body>\n"
        f"<h1>Docker Flow Proxy: {status} {title}</h1>\n<p>{message}</p>\n</body></html>\n".encode())
    head = (
        f"HTTP/1.1 {status} {title}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Cache-Control: no-cache\r\n"
        f"Content-Type: {content_type.decode('latin-1')}\r\n"
        + ("Connection: close\r\n" if close else "")
        + "\r\n"
    )
    return head.encode() + body


@lru_cache(maxsize=None)
def error_head_only(status: int, close: bool) -> bytes:
    """The same response without its body, for a HEAD request."""
    full = error_response(status, close)
    return full[: full.index(b"\r\n\r\n") + 4]
