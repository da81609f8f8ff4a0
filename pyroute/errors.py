"""The responses pyroute answers itself (no route, upstream down, bad request, ...).

Bodies follow HAProxy's built-in pages, which is what Docker Flow Proxy users see and
what their monitoring may grep for. Each response is encoded once and reused.
"""

from __future__ import annotations

from functools import lru_cache

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


def reason(status: int) -> str:
    return PAGES.get(status, ("Error", ""))[0]


@lru_cache(maxsize=None)
def error_response(status: int, close: bool) -> bytes:
    """A complete HTTP/1.1 response for `status`; `close` adds Connection: close."""
    title, message = PAGES[status]
    body = f"<html><body><h1>{status} {title}</h1>\n{message}\n</body></html>\n".encode()
    head = (
        f"HTTP/1.1 {status} {title}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Cache-Control: no-cache\r\n"
        "Content-Type: text/html\r\n"
        + ("Connection: close\r\n" if close else "")
        + "\r\n"
    )
    return head.encode() + body


@lru_cache(maxsize=None)
def error_head_only(status: int, close: bool) -> bytes:
    """The same response without its body, for a HEAD request."""
    full = error_response(status, close)
    return full[: full.index(b"\r\n\r\n") + 4]
