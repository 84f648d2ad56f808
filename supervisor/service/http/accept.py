"""Which form of an answer a caller asked for, from its ``Accept`` header
(RFC 9110, section 12.5.1): each media range with its quality, the most
specific range deciding for a type, the highest quality winning, the
server's order breaking a tie. No header, or ``*/*``, is the first form
offered; a header that accepts none of them is a 406 that lists them."""

from __future__ import annotations

from collections.abc import Sequence

from supervisor.service.http.errors import ApiError

MAX_RANGES = 32  # media ranges read from one header: more is no caller's real wish


def _ranges(header: str) -> list[tuple[str, float]]:
    out = []
    for part in header.split(",")[:MAX_RANGES]:
        media, *params = (p.strip() for p in part.split(";"))
        if "/" not in media:
            continue
        quality = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = min(max(float(value), 0.0), 1.0)
                except ValueError:
                    quality = 0.0
        out.append((media.lower(), quality))
    return out


def quality(media: str, ranges: list[tuple[str, float]]) -> float:
    """How much the caller wants ``media`` (``type/subtype``): the quality
    of the most specific range that matches it, 0 for none."""
    kind = media.split("/")[0]
    best, rank = 0.0, -1
    for given, q in ranges:
        level = 2 if given == media else 1 if given == f"{kind}/*" else 0 if given == "*/*" else -1
        if level > rank:
            best, rank = q, level
    return best if rank >= 0 else 0.0


def choose(header: str | None, offered: Sequence[str]) -> list[str]:
    """The forms of ``offered`` the caller accepts, the one it wants most
    first; every one of them, in their order, when it says nothing."""
    if not header or not header.strip():
        return list(offered)
    ranges = _ranges(header)
    if not ranges:
        return list(offered)
    wanted = [(quality(media, ranges), -n, media) for n, media in enumerate(offered)]
    return [media for q, _, media in sorted(wanted, reverse=True) if q > 0]


def not_acceptable(header: str | None, offered: Sequence[str], why: str = "") -> ApiError:
    shown = (header or "")[:100]
    message = f"Accept: {shown!r} names no form this answer has{why}; it comes as {', '.join(offered)}"
    return ApiError(406, message, "not_acceptable")
