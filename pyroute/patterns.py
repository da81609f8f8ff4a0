r"""Operator regular expressions (path_reg paths and excludes, reqPathSearchReplace), run by RE2.

Python's ``re`` backtracks: ``^/redos/(a+)+$`` against ``/redos/aaaa...!`` takes time
exponential in the path's length, on the loop every client shares (issue 14, F4). RE2
matches in time linear in the input; the constructs it refuses are the ones that need
backtracking (backreferences, lookaround, possessive quantifiers), so such a pattern is a
400 naming its parameter instead of a stall at request time. Patterns and paths are bytes
matched in RE2's Latin-1 mode, one byte per character, as Python's bytes patterns were.

Replacements follow HAProxy's regsub, which DFP hands them to: ``\0``..``\9`` insert a
group (``\0`` the whole match); ``\g<N>`` and ``\g<name>`` (Python's form, which earlier
pyroute versions took) too; ``\\`` is a backslash. Any other escape is refused rather than
turned into a control character, and literal text must be visible ASCII, so a rule can
never put a space, CR or LF into the request line it rewrites.
"""

from __future__ import annotations

import re

MAX_REPLACEMENT = 1024  # characters of a replacement template
MAX_GROUP_REFERENCES = 10  # group insertions per replacement: bounds how much one rule can multiply a path

_REFERENCE = re.compile(r"\\(?:([0-9])|g<([^>]*)>|(\\)|(.?))", re.S)
_LITERAL = re.compile(r"[!-~]*\Z")  # visible ASCII, no space


class PatternError(ValueError):
    """Why an operator pattern or replacement is refused (the text of the 400 answer)."""


def compile_pattern(text: str, ignore_case: bool = False):
    """The RE2 form of an operator regex (bytes in, Latin-1 mode); PatternError if RE2 refuses it.

    RE2 (~1.5 MiB resident) is imported here, by the first pattern: a proxy whose routes
    have none never loads it."""
    import re2

    options = re2.Options()
    options.encoding = re2.Options.Encoding.LATIN1
    options.log_errors = False  # the reason goes into the 400 answer, not to stderr
    options.case_sensitive = not ignore_case  # HAProxy's -i (pathType "path_reg -i")
    try:
        return re2.compile(text.encode(), options)
    except re2.error as exc:
        reason = exc.args[0].decode("utf-8", "replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise PatternError(f"RE2 refuses {text!r} ({reason}): pyroute runs operator regexes in linear time, "
                           "without backreferences or lookaround") from None


def compile_replacement(text: str, pattern) -> tuple:
    """A replacement template as literal bytes and group numbers, checked against `pattern`."""
    parts: list = []
    references = 0
    last = 0
    for match in _REFERENCE.finditer(text):
        parts.append(_literal(text[last : match.start()]))
        last = match.end()
        digit, name, backslash, other = match.groups()
        if backslash:
            parts.append(b"\\")
            continue
        if digit is None and name is None:
            raise PatternError(f"unsupported escape {match.group(0)!r} in the replacement: \\0..\\9 insert a "
                               "group, \\\\ is a backslash")
        group = int(digit) if digit is not None else _group_number(name, pattern)
        if group > pattern.groups:
            raise PatternError(f"the replacement refers to group {group}, the pattern has {pattern.groups}")
        references += 1
        parts.append(group)
    parts.append(_literal(text[last:]))
    if references > MAX_GROUP_REFERENCES:
        raise PatternError(f"the replacement has {references} group references, at most {MAX_GROUP_REFERENCES}")
    if len(text) > MAX_REPLACEMENT:
        raise PatternError(f"the replacement is longer than {MAX_REPLACEMENT} characters")
    return tuple(p for p in parts if p != b"")


def _group_number(name: str, pattern) -> int:
    if name.isascii() and name.isdigit():
        return int(name)
    number = pattern.groupindex.get(name.encode())
    if number is None:
        raise PatternError(f"the replacement refers to group {name!r}, which the pattern does not name")
    return number


def _literal(text: str) -> bytes:
    if not _LITERAL.match(text):
        raise PatternError(f"the replacement text {text!r} may hold only visible ASCII: no space, "
                           "control character or non-ASCII (percent-encode them)")
    return text.encode("ascii")


def substitute_first(pattern, template: tuple, path: bytes) -> bytes:
    """HAProxy's regsub without the g flag: the first match of `pattern` in `path` replaced."""
    match = pattern.search(path)
    if match is None:
        return path
    out = [path[: match.start()]]
    for part in template:
        out.append(part if part.__class__ is bytes else (match[part] or b""))
    out.append(path[match.end() :])
    return b"".join(out)
