"""Request bodies recorded as deltas against the previous request of the same conversation.

Every turn of an LLM conversation sends the whole history again, so recording each request body
whole makes a session's record grow with the square of its length: a 300-turn Claude Code
session sends its first messages 300 times. The local store therefore records a tracked turn's
body as the ops that rebuild it from an earlier body of the same conversation (its *base*):

    "body_delta": {"base": "<exchange id>", "ops": [[offset, length], "text", [offset, length]]}
    "body_sha256": "<hex digest of the body>"

``[offset, length]`` copies that many bytes of the base body from ``offset``; a string is
inserted as its UTF-8 bytes. What a turn added (the new messages, the moved ``cache_control``
marker) is therefore readable in the entry itself, one JSON line as before, while the history
it repeats is a pair of numbers. A body is recorded whole (``body`` as before) when there is no
base in memory (the first turn, a restarted recorder, an evicted conversation), when it is not
UTF-8, or when the delta would not be much smaller.

Matching is done on pieces cut before every ``{"`` (the start of every JSON object: messages,
content blocks, tools): the common prefix and suffix are found with byte comparisons, and the
pieces between them are looked up among the base's pieces, so several edits in one body (Claude
Code rewrites a system entry, moves cache markers, clears old tool results) each cost only the
changed pieces. ``rebuild`` applies the ops; ``otelproxy show --raw`` uses it and checks the
SHA-256, so every recorded body comes back byte for byte. The SHA-256 of a body is taken on from
the hash state its base had at the last ``CHECKPOINT`` boundary of their common prefix, so a turn
hashes what it added, not the history again.

``Recent`` is the memory the recorder's processors share the same idea through: what they derived
from the previous body of a conversation (its redaction, its parsed JSON), to derive the next
body's from it where the two bodies are the same bytes.
"""

from __future__ import annotations

import base64
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from types import GenericAlias

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Generic, TypeVar

    T = TypeVar("T")

    class _Generic(Generic[T]):
        pass
else:

    class _Generic:
        """``Recent``'s base: generic in ``T`` for the type checker; at run time ``Recent[X]``
        is ``Recent``'s alias, as ``list[X]`` is ``list``'s, and ``typing`` is not imported
        (``otelproxy.recorder_process``)."""

        __class_getitem__ = classmethod(GenericAlias)

Op = list[int] | str
"""``[offset, length]`` of the base, or text to insert."""

CUT = b'{"'
"""Pieces start at every JSON object."""
_BLOCK = 1 << 16
WORTH_IT = 0.5
"""A delta is recorded only when its ops take less than this share of the body."""


class DeltaError(Exception):
    """A recorded body could not be rebuilt (missing base, damaged entry, hash mismatch)."""


def common_prefix(a: bytes, b: bytes) -> int:
    """Length of the longest common prefix, compared a block at a time (memcmp speed: the
    blocks are compared through a memoryview, not copied)."""
    limit = min(len(a), len(b))
    view = memoryview(b)
    start = 0
    while start < limit:
        end = min(limit, start + _BLOCK)
        if a.startswith(view[start:end], start):
            start = end
            continue
        lo, hi = start, end  # the first difference lies in [start, end)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if a.startswith(view[lo:mid], lo):
                lo = mid
            else:
                hi = mid
        return lo
    return limit


def common_suffix(a: bytes, b: bytes, limit: int) -> int:
    """Length of the longest common suffix, at most ``limit``."""
    view = memoryview(b)
    n = 0
    while n < limit:
        step = min(limit - n, _BLOCK)
        if a.endswith(view[len(b) - n - step:len(b) - n], 0, len(a) - n):
            n += step
            continue
        lo, hi = 0, step  # lo bytes more match, hi do not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if a.endswith(view[len(b) - n - mid:len(b) - n], 0, len(a) - n):
                lo = mid
            else:
                hi = mid
        return n + lo
    return n


def _utf8_start(data: bytes, at: int) -> int:
    """``at`` moved back to the start of a UTF-8 character."""
    while 0 < at < len(data) and data[at] & 0xC0 == 0x80:
        at -= 1
    return at


def _pieces(data: bytes, start: int, end: int) -> list[tuple[int, int]]:
    """``(offset, length)`` of the pieces of ``data[start:end]``, each starting at ``{"``."""
    out: list[tuple[int, int]] = []
    at = start
    while at < end:
        cut = data.find(CUT, at + 1, end)
        if cut < 0:
            cut = end
        out.append((at, cut - at))
        at = cut
    return out


def diff(base: bytes, body: bytes) -> list[Op]:
    """Ops that rebuild ``body`` from ``base`` (see the module docstring)."""
    head = _utf8_start(body, common_prefix(base, body))
    tail = common_suffix(base, body, min(len(base), len(body)) - head)
    while tail and body[len(body) - tail] & 0xC0 == 0x80:
        tail -= 1
    ops: list[Op] = [[0, head]] if head else []
    index: dict[bytes, int] = {}
    for offset, length in _pieces(base, head, len(base) - tail):
        index.setdefault(base[offset:offset + length], offset)
    run: list[int] | None = None
    literal: list[bytes] = []
    for offset, length in _pieces(body, head, len(body) - tail):
        piece = body[offset:offset + length]
        found = index.get(piece) if length > 16 else None
        if found is None:
            literal.append(piece)
            run = None
            continue
        if literal:
            ops.append(b"".join(literal).decode("utf-8"))
            literal = []
        if run is not None and run[0] + run[1] == found:
            run[1] += length
        else:
            run = [found, length]
            ops.append(run)
    if literal:
        ops.append(b"".join(literal).decode("utf-8"))
    if tail:
        ops.append([len(base) - tail, tail])
    return ops


def rebuild(base: bytes, ops: list[Any]) -> bytes:
    """The body the ops describe (raises DeltaError on ops that do not fit the base)."""
    parts: list[bytes] = []
    for op in ops:
        if isinstance(op, str):
            parts.append(op.encode("utf-8"))
        elif isinstance(op, list) and len(op) == 2 and all(isinstance(n, int) for n in op):
            offset, length = op
            if offset < 0 or length < 0 or offset + length > len(base):
                raise DeltaError(f"copy [{offset}, {length}] outside a base of {len(base)} bytes")
            parts.append(base[offset:offset + length])
        else:
            raise DeltaError(f"not a delta op: {op!r}")
    return b"".join(parts)


try:  # the interpreter's own SHA-256: the recorder then never loads OpenSSL's libcrypto
    from _sha2 import sha256 as _sha256_type  # type: ignore[import-not-found,unused-ignore]
except ImportError:  # Python 3.11
    try:
        from _sha256 import sha256 as _sha256_type  # type: ignore[import-not-found,no-redef,unused-ignore]
    except ImportError:  # a build without the built-in hashes (FIPS): OpenSSL's
        from hashlib import sha256 as _sha256_type  # type: ignore[assignment,unused-ignore]
new_sha256: Callable[..., Any] = _sha256_type
"""A new SHA-256 hash object. Not ``hashlib``'s: importing ``hashlib`` loads libcrypto, which
took the recorder's resident set up by 3.5 MiB. The built-in one is about 7 times slower (0.47
against 0.065 ms per 100 KB here), but the recorder hashes little per turn: what the turn added
(``Sha256Prefixes``), and a system prompt only when it changed (``otelproxy.sessions``)."""


def sha256(data: bytes) -> str:
    return str(new_sha256(data).hexdigest())


CHECKPOINT = 1 << 13
"""A body's hash state is kept every this many bytes (``Sha256Prefixes``): a turn hashes what
it added and at most this much before it; the states weigh about 2 % of a body (144 bytes each)."""


class Sha256Prefixes:
    """The SHA-256 of a body, and its hash states at every ``CHECKPOINT`` bytes, so that the
    digest of a body sharing a prefix with it is computed from the last state in that prefix."""

    __slots__ = ("_states", "digest")

    def __init__(self, body: bytes, previous: Sha256Prefixes | None = None,
                 shared: int = 0) -> None:
        """``previous`` was made of a body whose first ``shared`` bytes are ``body``'s."""
        usable = min(shared // CHECKPOINT, len(previous._states)) if previous else 0
        self._states: list[Any] = previous._states[:usable] if previous else []
        hasher = self._states[-1].copy() if usable else new_sha256()
        view = memoryview(body)
        for at in range(usable * CHECKPOINT, len(body) - len(body) % CHECKPOINT, CHECKPOINT):
            hasher.update(view[at:at + CHECKPOINT])
            self._states.append(hasher.copy())
        hasher.update(view[len(body) - len(body) % CHECKPOINT:])
        self.digest = hasher.hexdigest()


@dataclass(slots=True)
class _Base:
    exchange_id: str
    body: bytes
    hashes: Sha256Prefixes


class DeltaEncoder:
    """The last request body of each recent conversation, kept to encode the next one.

    Bounded: at most ``max_bytes`` of bodies in memory, least recently used dropped first (its
    conversation's next body is then recorded whole).
    """

    def __init__(self, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self._bases: OrderedDict[str, _Base] = OrderedDict()
        self._bytes = 0

    def encode(self, conversation: str, exchange_id: str, body: bytes,
               fallback: str | None = None) -> dict[str, Any] | None:
        """Entry fields replacing ``body`` (None: record it whole). Remembers ``body`` as the
        conversation's next base; ``fallback`` names another conversation to take the base
        from when this one has none (a branch's parent)."""
        base = self._bases.get(conversation) or (
            self._bases.get(fallback) if fallback is not None else None)
        fields: dict[str, Any] | None = None
        hashes: Sha256Prefixes | None = None
        if base is not None and body:
            try:
                ops = diff(base.body, body)
            except UnicodeDecodeError:
                ops = None
            if ops is not None:
                cost = sum(len(op) if isinstance(op, str) else 24 for op in ops)
                if cost < WORTH_IT * len(body):
                    shared = ops[0][1] if ops and isinstance(ops[0], list) and \
                        ops[0][0] == 0 else 0
                    hashes = Sha256Prefixes(body, base.hashes, shared)
                    fields = {"body_delta": {"base": base.exchange_id, "ops": ops},
                              "body_sha256": hashes.digest}
        self.remember(conversation, exchange_id, body, hashes)
        return fields

    def remember(self, conversation: str, exchange_id: str, body: bytes,
                 hashes: Sha256Prefixes | None = None) -> None:
        self.forget(conversation)
        if len(body) > self.max_bytes:
            return
        self._bases[conversation] = _Base(exchange_id, body, hashes or Sha256Prefixes(body))
        self._bytes += len(body)
        while self._bytes > self.max_bytes:
            _, old = self._bases.popitem(last=False)
            self._bytes -= len(old.body)

    def forget(self, conversation: str) -> None:
        """Drop a conversation's base (its record write failed: the base may not exist)."""
        old = self._bases.pop(conversation, None)
        if old is not None:
            self._bytes -= len(old.body)


def decode_body(entry: dict[str, Any], key: str = "body") -> bytes:
    """The bytes of a whole body field (text, or base64 with ``{key}_encoding``)."""
    value = entry.get(key)
    if not isinstance(value, str):
        raise DeltaError(f"entry {entry.get('exchange_id')} has no {key}")
    if entry.get(f"{key}_encoding") == "base64":
        return base64.b64decode(value)
    return value.encode("utf-8")


def request_body(entry: dict[str, Any], load: Callable[[str], dict[str, Any]],
                 depth: int = 0) -> bytes:
    """The exact recorded request body of a ``request`` entry, following ``body_delta`` bases
    through ``load(exchange_id) -> request entry``; checks ``body_sha256``."""
    delta = entry.get("body_delta")
    if delta is None:
        return decode_body(entry, "body")
    if depth > 100_000:
        raise DeltaError("delta chain too long (a cycle?)")
    base = request_body(load(delta["base"]), load, depth + 1)
    body = rebuild(base, delta["ops"])
    if sha256(body) != entry.get("body_sha256"):
        raise DeltaError(f"exchange {entry.get('exchange_id')}: rebuilt body does not match "
                         "its body_sha256")
    return body


class Recent(_Generic["T"]):
    """What a processor derived from recent request bodies, per conversation key (what the
    headers and the start of a body say of its conversation): the last ``per_key`` bodies of
    each key, at most ``max_bytes`` of bodies in all, least recently used dropped first.

    ``find`` gives the remembered body sharing the longest prefix with a new one. Nothing is
    trusted from the key: whoever uses an item compares the bytes of the two bodies."""

    def __init__(self, max_bytes: int = 32 * 1024 * 1024, per_key: int = 2) -> None:
        self.max_bytes = max_bytes
        self.per_key = per_key
        self._items: OrderedDict[Hashable, list[tuple[bytes, T]]] = OrderedDict()
        self._bytes = 0

    def find(self, key: Hashable, body: bytes) -> tuple[T, int] | None:
        """The item of the remembered body sharing the longest prefix with ``body``, and the
        length of that prefix (the newest of equals); None when none shares a byte."""
        best: tuple[T, int] | None = None
        for old, item in self._items.get(key, ()):
            shared = common_prefix(old, body)
            if shared > (best[1] if best else 0):
                best = (item, shared)
        return best

    def derive(self, key: Hashable, body: bytes,
               make: Callable[[bytes, T | None, int | None], T]) -> T:
        """``make(body, previous item, length of the prefix they share)`` (``None, None``
        when no body shares a byte), remembered in place of the previous item."""
        found = self.find(key, body)
        previous = found[0] if found else None
        item = make(body, previous, found[1] if found else None)
        self.keep(key, body, item, previous)
        return item

    def keep(self, key: Hashable, body: bytes, item: T, replaces: T | None = None) -> None:
        """Remember ``item`` for ``body`` (in place of ``replaces``, the item it came from)."""
        if len(body) > self.max_bytes:
            return
        items = self._items.pop(key, [])
        kept = [(body, item)]
        for old in items:
            if old[1] is replaces or len(kept) >= self.per_key:
                self._bytes -= len(old[0])
            else:
                kept.append(old)
        self._items[key] = kept
        self._bytes += len(body)
        while self._bytes > self.max_bytes:
            _, dropped = self._items.popitem(last=False)
            self._bytes -= sum(len(old) for old, _ in dropped)


@dataclass(slots=True)
class _Spliced:
    """A body as ``base[:head] + middle + base[len(base) - tail:]``."""

    base: bytes
    head: int
    middle: bytes
    tail: int

    def body(self) -> bytes:
        base = self.base
        if not self.middle and self.head + self.tail == len(base):
            return base  # the same bytes: the same object, held once by every cache after
        return b"".join((memoryview(base)[:self.head], self.middle,
                         memoryview(base)[len(base) - self.tail:]))


class Handed:
    """Request bodies the proxy handed over while their stream still runs (``channel.Begun``),
    until the rest of their exchange arrives.

    A conversation's request body repeats its previous one and adds a little, and the recorder
    keeps the previous one anyway (its processors and ``DeltaEncoder`` derive the next turn from
    it). So a handed body is held as its common prefix and suffix with the most similar recent
    body (``Recent``, by conversation key) and the bytes between: an open stream then costs the
    record the turn's new bytes, not its whole history again. A body with no similar one is held
    whole. ``take`` gives back the exact bytes."""

    def __init__(self, max_bytes: int = 32 * 1024 * 1024) -> None:
        self._recent: Recent[bytes] = Recent(max_bytes, per_key=2)  # each body its own item
        self._held: dict[str, tuple[Hashable, _Spliced | bytes]] = {}

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, exchange_id: str, key: Hashable, body: bytes) -> None:
        """Keep ``body`` until ``take``; ``key`` is where to look for a similar body."""
        found = self._recent.find(key, body) if body else None
        held: _Spliced | bytes = body
        if found is not None:
            base, head = found
            tail = common_suffix(base, body, min(len(base), len(body)) - head)
            if head + tail >= len(body) // 2:
                held = _Spliced(base, head, body[head:len(body) - tail], tail)
        if held is body:  # held whole: a base for the streams of its conversation opened next
            self._recent.keep(key, body, body)
        self._held[exchange_id] = (key, held)

    def take(self, exchange_id: str) -> bytes | None:
        """The exact body handed for ``exchange_id``, which becomes a base for the next ones
        of its conversation (None: this recorder was not given it)."""
        found = self._held.pop(exchange_id, None)
        if found is None:
            return None
        key, held = found
        if isinstance(held, _Spliced):
            body = held.body()
            self._recent.keep(key, body, body)
        else:  # remembered when held: once is enough
            body = held
            self._recent.keep(key, body, body, replaces=body)
        return body
