#!/usr/bin/env python3
"""An example keyhole secret provider: in-memory, JSON encoding, protocol major 1.

Written from PROTOCOL.md and provider-protocol/schema/v1.json only, with the Python 3.11
standard library. It keeps secrets in memory and forgets them on exit, so it is a template and a
test subject, not a real secret store.

    keyhole_provider.py --connect SOCKET                    # spawn mode (section 9.1)
    keyhole_provider.py --listen SOCKET --token-file FILE   # connect mode (section 9.2)

In spawn mode the token comes from the environment variable KEYHOLE_PROVIDER_TOKEN.
Logs go to stderr (set KEYHOLE_LOG=debug for more); nothing is ever written to stdout.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import hashlib
import json
import logging
import os
import re
import secrets
import signal
import socket
import stat
import struct
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

PROVIDER_NAME = "example-py"
PROVIDER_VERSION = "0.1.0"

MAGIC = b"KHOL"
HEADER = struct.Struct(">4sHBBI")  # magic, major, encoding id, flags, length (section 2.1)
ENC_JSON = 1
ENC_BINCODE = 2
KNOWN_ENCODING_IDS = (ENC_JSON, ENC_BINCODE)

OUR_MAJORS = [1]
OUR_ENCODINGS = ["json"]  # bincode is optional (section 3); this provider speaks JSON only
AGREED_MAJOR = 1

HANDSHAKE_CAP = 64 * 1024  # section 2.5: fixed cap for the two handshake frames
OWN_MAX_FRAME = 1 << 20  # what we announce in HelloAck.max_frame
MIN_FRAME = 1 << 20
MAX_FRAME = 1 << 24
HELLO_TIMEOUT_S = 5.0  # section 4.1 step 2
VERSIONS_KEPT = 10
MAX_NAME_BYTES = 1024
LIST_DEFAULT_LIMIT = 100
LIST_MAX_LIMIT = 1000

U16_MAX = (1 << 16) - 1
U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1

RETRYABLE_CODES = frozenset({"Locked", "Unavailable", "DeadlineExceeded"})  # section 6

log = logging.getLogger("keyhole-example-py")


# --------------------------------------------------------------------------------------------
# Framing and strict JSON decoding
# --------------------------------------------------------------------------------------------


def pack_frame(major: int, encoding_id: int, payload: bytes) -> bytes:
    return HEADER.pack(MAGIC, major, encoding_id, 0, len(payload)) + payload


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class DecodeError(Exception):
    """The payload is not one well-formed message. The text never quotes the payload."""


def _no_duplicate_fields(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise DecodeError("a field appears twice in one object")
        obj[key] = value
    return obj


def _reject_float(_text: str) -> Any:
    raise DecodeError("numbers must be plain integers")


def _reject_constant(_text: str) -> Any:
    raise DecodeError("NaN and Infinity are not JSON")


def _parse_int(text: str) -> int:
    if text.startswith("-"):
        raise DecodeError("integers must not have a sign")
    return int(text)


def strict_loads(payload: bytes) -> Any:
    """Decode exactly one JSON value, UTF-8, no BOM, no duplicate fields, integers only."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise DecodeError("payload is not UTF-8") from None
    try:
        value = json.loads(
            text,
            object_pairs_hook=_no_duplicate_fields,
            parse_float=_reject_float,
            parse_int=_parse_int,
            parse_constant=_reject_constant,
        )
    except DecodeError:
        raise
    except (ValueError, RecursionError):
        # Never include the parser's text: it may quote the input.
        raise DecodeError("payload is not one JSON value") from None
    # JSON allows escaped lone surrogates ("\ud800"), which are not Unicode scalar values and
    # cannot be UTF-8. Treat them as a decode error, wherever they are.
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            _check_scalar_string(item)
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            for k, v in item.items():
                _check_scalar_string(k)
                stack.append(v)
    return value


def _check_scalar_string(s: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise DecodeError("a string holds a lone surrogate") from None


def want_obj(v: Any) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise DecodeError("expected an object")
    return v


def required(o: dict[str, Any], key: str) -> Any:
    if key not in o:
        raise DecodeError(f"missing field {key}")
    return o[key]


def want_int(v: Any, maximum: int) -> int:
    if type(v) is not int or v < 0 or v > maximum:
        raise DecodeError("expected an unsigned integer in range")
    return v


def want_str(v: Any) -> str:
    if not isinstance(v, str):
        raise DecodeError("expected a string")
    return v


def want_opt_str(v: Any) -> str | None:
    return None if v is None else want_str(v)


def want_bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise DecodeError("expected a boolean")
    return v


def want_list(v: Any, item: Callable[[Any], Any]) -> list[Any]:
    if not isinstance(v, list):
        raise DecodeError("expected a list")
    return [item(x) for x in v]


def want_labels(v: Any) -> dict[str, str]:
    o = want_obj(v)
    for val in o.values():
        want_str(val)
    return dict(o)


def want_secret_bytes(v: Any) -> bytes:
    """Standard base64 with padding (RFC 4648 section 4), canonical, no line breaks."""
    s = want_str(v)
    try:
        raw = base64.b64decode(s.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        raise DecodeError("a secret value is not valid base64") from None
    if base64.b64encode(raw).decode("ascii") != s:
        raise DecodeError("a secret value is not canonical base64")
    return raw


def want_variant(v: Any, allowed: frozenset[str]) -> tuple[str, Any]:
    """An externally tagged enum: an object with exactly one key, a known variant name."""
    o = want_obj(v)
    if len(o) != 1:
        raise DecodeError("an enum object must have exactly one key")
    ((key, body),) = o.items()
    if key not in allowed:
        raise DecodeError("unknown variant")
    return key, body


@dataclass
class Hello:
    majors: list[int]
    encodings: list[str]
    features: list[str]
    token: str
    max_frame: int


def decode_hello(payload: bytes) -> Hello:
    o = want_obj(strict_loads(payload))
    return Hello(
        majors=want_list(required(o, "majors"), lambda x: want_int(x, U16_MAX)),
        encodings=want_list(required(o, "encodings"), want_str),
        features=want_list(required(o, "features"), want_str),
        token=want_str(required(o, "token")),
        max_frame=want_int(required(o, "max_frame"), U32_MAX),
    )


@dataclass
class Request:
    id: int
    timeout_ms: int
    op: str
    args: dict[str, Any]


def _parse_op_args(op: str, body: Any) -> dict[str, Any]:
    b = want_obj(body)  # unknown fields are ignored; missing optional fields are null
    if op == "resolve":
        return {"name": want_str(required(b, "name")), "version": want_opt_str(b.get("version"))}
    if op == "store":
        return {
            "name": want_str(required(b, "name")),
            "value": want_secret_bytes(required(b, "value")),
            "create_only": want_bool(required(b, "create_only")),
            "labels": want_labels(required(b, "labels")),
        }
    if op == "rotate":
        return {
            "name": want_str(required(b, "name")),
            "value": want_secret_bytes(required(b, "value")),
            "expected_version": want_opt_str(b.get("expected_version")),
        }
    if op in ("revoke", "describe"):
        return {"name": want_str(required(b, "name"))}
    if op == "list":
        return {
            "prefix": want_str(required(b, "prefix")),
            "page": want_opt_str(b.get("page")),
            "limit": want_int(required(b, "limit"), U32_MAX),
        }
    if op == "watch":
        return {"prefix": want_str(required(b, "prefix"))}
    if op == "cancel":
        return {"id": want_int(required(b, "id"), U64_MAX)}
    return {}  # health, goodbye: no fields


OPS = frozenset(
    {"resolve", "store", "rotate", "revoke", "describe", "list", "health", "watch", "cancel", "goodbye"}
)


def decode_request(payload: bytes) -> Request:
    o = want_obj(strict_loads(payload))
    rid = want_int(required(o, "id"), U64_MAX)
    timeout_ms = want_int(required(o, "timeout_ms"), U32_MAX)
    op, body = want_variant(required(o, "op"), OPS)
    return Request(rid, timeout_ms, op, _parse_op_args(op, body))


# --------------------------------------------------------------------------------------------
# Errors, names
# --------------------------------------------------------------------------------------------


class OpError(Exception):
    def __init__(self, code: str, message: str, op: str | None = None) -> None:
        super().__init__(code)
        self.code = code
        self.message = message
        self.op = op


def error_obj(code: str, message: str, op: str | None = None) -> dict[str, Any]:
    return {
        "code": code,
        "message": message,
        "retryable": code in RETRYABLE_CODES,
        "op": op if code == "Unsupported" else None,
    }


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")  # Unicode category Cc


def check_name(name: str, *, what: str = "name", allow_empty: bool = False) -> None:
    size = len(name.encode("utf-8"))
    if (size == 0 and not allow_empty) or size > MAX_NAME_BYTES or _CONTROL.search(name):
        lo = 0 if allow_empty else 1
        raise OpError(
            "InvalidRequest",
            f"invalid {what}: it must be {lo} to {MAX_NAME_BYTES} bytes of UTF-8 with no control "
            f"character (got {size} bytes)",
        )


def quote(name: str) -> str:
    text = json.dumps(name, ensure_ascii=False)
    return text if len(text) <= 200 else text[:196] + '..."'


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# --------------------------------------------------------------------------------------------
# The backend: an in-memory store shared by every connection of the process
# --------------------------------------------------------------------------------------------


@dataclass
class Version:
    number: int
    value: bytes
    created_at_ms: int

    @property
    def label(self) -> str:
        return str(self.number)


@dataclass
class Secret:
    name: str
    created_at_ms: int
    updated_at_ms: int
    labels: dict[str, str]
    counter: int = 0  # the last version number issued; never reused, even across a revoke
    revoked: bool = False
    revoked_upto: int = 0  # versions up to this number were issued before the last revoke
    kept: list[Version] = field(default_factory=list)  # readable versions, oldest first


WatchCallback = Callable[[str, str, str | None], None]


class MemoryStore:
    def __init__(self) -> None:
        self.secrets: dict[str, Secret] = {}
        self.watchers: dict[object, tuple[str, WatchCallback]] = {}
        self._page_key = secrets.token_bytes(32)

    # -- watch plumbing ------------------------------------------------------------------------
    def watch(self, key: object, prefix: str, callback: WatchCallback) -> None:
        self.watchers[key] = (prefix, callback)

    def unwatch(self, key: object) -> None:
        self.watchers.pop(key, None)

    def _notify(self, name: str, change: str, version: str | None) -> None:
        for prefix, callback in list(self.watchers.values()):
            if name.startswith(prefix):
                try:
                    callback(name, change, version)
                except Exception:  # a broken watcher must not break the store
                    log.error("watch callback failed")

    # -- helpers --------------------------------------------------------------------------------
    def _add_version(self, s: Secret, value: bytes) -> Version:
        s.counter += 1
        t = now_ms()
        v = Version(s.counter, bytes(value), t)
        s.kept.append(v)
        del s.kept[:-VERSIONS_KEPT]
        s.revoked = False
        s.updated_at_ms = t
        return v

    def _get(self, name: str) -> Secret:
        s = self.secrets.get(name)
        if s is None:
            raise OpError("NotFound", f"no secret named {quote(name)}")
        return s

    @staticmethod
    def describe_secret(s: Secret) -> dict[str, Any]:
        return {
            "name": s.name,
            "state": "revoked" if s.revoked else "active",
            "current_version": None if s.revoked else s.kept[-1].label,
            "versions": [{"version": v.label, "created_at_ms": v.created_at_ms} for v in s.kept],
            "created_at_ms": s.created_at_ms,
            "updated_at_ms": s.updated_at_ms,
            "labels": dict(s.labels),
        }

    # -- operations (section 7) -----------------------------------------------------------------
    def resolve(self, name: str, version: str | None) -> tuple[bytes, str]:
        s = self._get(name)
        if s.revoked:
            raise OpError("Revoked", f"secret {quote(name)} is revoked")
        if version is None:
            v = s.kept[-1]
            return v.value, v.label
        for v in s.kept:
            if v.label == version:
                return v.value, v.label
        if re.fullmatch(r"[1-9][0-9]{0,18}", version) and int(version) <= s.revoked_upto:
            raise OpError(
                "Revoked", f"version {quote(version)} of {quote(name)} was revoked"
            )
        raise OpError(
            "VersionUnavailable",
            f"version {quote(version)} of {quote(name)} is unknown or no longer kept "
            f"(this provider keeps the last {VERSIONS_KEPT})",
        )

    def store(self, name: str, value: bytes, create_only: bool, labels: dict[str, str]) -> str:
        s = self.secrets.get(name)
        if s is None:
            t = now_ms()
            s = Secret(name=name, created_at_ms=t, updated_at_ms=t, labels=dict(labels))
            self.secrets[name] = s
        elif create_only:
            state = "revoked" if s.revoked else "active"
            raise OpError("AlreadyExists", f"secret {quote(name)} already exists ({state})")
        else:
            s.labels = dict(labels)
        v = self._add_version(s, value)
        self._notify(name, "updated", v.label)
        return v.label

    def rotate(self, name: str, value: bytes, expected_version: str | None) -> str:
        s = self._get(name)
        if expected_version is not None:
            if s.revoked:
                raise OpError(
                    "Conflict",
                    f"expected version {quote(expected_version)}, but {quote(name)} is revoked "
                    "and has no current version",
                )
            current = s.kept[-1].label
            if expected_version != current:
                raise OpError(
                    "Conflict",
                    f"expected version {quote(expected_version)}, but the current version of "
                    f"{quote(name)} is {quote(current)}",
                )
        v = self._add_version(s, value)
        self._notify(name, "updated", v.label)
        return v.label

    def revoke(self, name: str) -> None:
        s = self._get(name)
        if s.revoked:
            return  # idempotent: nothing changes
        s.revoked = True
        s.revoked_upto = s.counter
        s.kept.clear()  # drop the values: nothing of a revoked secret stays readable
        s.updated_at_ms = now_ms()
        self._notify(name, "revoked", None)

    def describe(self, name: str) -> dict[str, Any]:
        return self.describe_secret(self._get(name))

    def list(
        self, prefix: str, page: str | None, limit: int, byte_budget: int
    ) -> tuple[list[dict[str, Any]], str | None]:
        after = None if page is None else self._read_page_token(prefix, page)
        limit = LIST_DEFAULT_LIMIT if limit == 0 else min(limit, LIST_MAX_LIMIT)
        keyed = sorted(
            (n.encode("utf-8"), n) for n in self.secrets if n.startswith(prefix)
        )
        if after is not None:
            keyed = [(k, n) for k, n in keyed if k > after]
        entries: list[dict[str, Any]] = []
        used = 0
        for _, n in keyed:
            if len(entries) >= limit:
                break
            d = self.describe_secret(self.secrets[n])
            size = len(dumps(d)) + 1
            if entries and used + size > byte_budget:
                break  # a shorter page keeps the reply under the gateway's max_frame
            entries.append(d)
            used += size
        next_page = None
        if len(entries) < len(keyed):
            next_page = self._make_page_token(prefix, entries[-1]["name"].encode("utf-8"))
        return entries, next_page

    # Page token: "p1." + base64url(mac16 + last name bytes). The MAC (keyed per process) lets
    # us tell our own tokens from forged or foreign ones, and binds the token to the prefix.
    def _page_mac(self, prefix: str, last: bytes) -> bytes:
        p = prefix.encode("utf-8")
        msg = b"keyhole-page\0" + len(p).to_bytes(4, "big") + p + last
        return hmac.new(self._page_key, msg, hashlib.sha256).digest()[:16]

    def _make_page_token(self, prefix: str, last: bytes) -> str:
        raw = self._page_mac(prefix, last) + last
        return "p1." + base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")

    def _read_page_token(self, prefix: str, token: str) -> bytes:
        bad = OpError("InvalidRequest", "the page token was not issued by this provider for this prefix")
        if not token.startswith("p1.") or len(token) > 4096:
            raise bad
        body = token[3:]
        try:
            raw = base64.urlsafe_b64decode((body + "=" * (-len(body) % 4)).encode("ascii"))
        except (UnicodeEncodeError, binascii.Error, ValueError):
            raise bad from None
        if len(raw) < 16:
            raise bad
        mac, last = raw[:16], raw[16:]
        if not hmac.compare_digest(mac, self._page_mac(prefix, last)):
            raise bad
        return last


# --------------------------------------------------------------------------------------------
# One connection
# --------------------------------------------------------------------------------------------


class ProtocolFault(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(code)
        self.code = code
        self.message = message


@dataclass
class InFlight:
    id: int
    kind: str  # "op" or "watch"
    task: asyncio.Task[None] | None = None
    timer: asyncio.TimerHandle | None = None
    watch_key: object | None = None


class Connection:
    _counter = 0

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        store: MemoryStore,
        token: str,
        opened_at: float,
    ) -> None:
        Connection._counter += 1
        self.cid = Connection._counter
        self.reader = reader
        self.writer = writer
        self.store = store
        self.token = token
        self.loop = asyncio.get_running_loop()
        self.opened_at = opened_at
        self.inflight: dict[int, InFlight] = {}
        self.closed = False
        self.peer_max_frame = MIN_FRAME
        self.max_value_size = 0
        self.tasks: set[asyncio.Task[None]] = set()  # strong references to running op tasks

    # -- lifecycle -------------------------------------------------------------------------------
    async def serve(self) -> None:
        try:
            if await self.handshake():
                await self.request_loop()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never crash on any input; never log the exception text
            log.error(
                "connection %d: internal error %s\n%s",
                self.cid,
                type(exc).__name__,
                "".join(traceback.format_tb(exc.__traceback__)),
            )
        finally:
            await self.teardown()

    async def teardown(self) -> None:
        self.closed = True
        for entry in list(self.inflight.values()):
            self._drop(entry)
        self.inflight.clear()
        for task in list(self.tasks):
            task.cancel()
        try:
            self.writer.close()
            await asyncio.wait_for(self.writer.wait_closed(), 2.0)
        except (Exception, asyncio.CancelledError):
            pass
        log.info("connection %d: closed", self.cid)

    def _drop(self, entry: InFlight) -> None:
        if entry.timer is not None:
            entry.timer.cancel()
        if entry.task is not None and not entry.task.done():
            entry.task.cancel()
        if entry.watch_key is not None:
            self.store.unwatch(entry.watch_key)

    # -- writing -------------------------------------------------------------------------------
    def _write(self, frame: bytes) -> None:
        try:
            self.writer.write(frame)  # one whole frame per call: frames never interleave
        except Exception:
            pass

    async def drain(self) -> None:
        try:
            await self.writer.drain()
        except (ConnectionError, RuntimeError):
            pass

    def send(self, msg: dict[str, Any]) -> None:
        if self.closed:
            return
        payload = dumps(msg)
        if len(payload) > self.peer_max_frame:
            if "response" not in msg:
                log.error("connection %d: dropped an oversized frame", self.cid)
                return
            rid = msg["response"]["id"]
            log.error("connection %d: reply to %d exceeds the gateway's max_frame", self.cid, rid)
            payload = dumps(
                self._response(
                    rid,
                    {"err": error_obj(
                        "Internal",
                        f"the reply ({len(payload)} bytes) exceeds the gateway's max_frame "
                        f"of {self.peer_max_frame} bytes",
                    )},
                )
            )
        self._write(pack_frame(AGREED_MAJOR, ENC_JSON, payload))

    @staticmethod
    def _response(rid: int, outcome: dict[str, Any]) -> dict[str, Any]:
        return {"response": {"id": rid, "outcome": outcome}}

    def respond_ok(self, rid: int, reply: dict[str, Any]) -> None:
        self.send(self._response(rid, {"ok": reply}))

    def respond_err(self, rid: int, code: str, message: str, op: str | None = None) -> None:
        self.send(self._response(rid, {"err": error_obj(code, message, op)}))

    def finish(self, rid: int, outcome: dict[str, Any]) -> None:
        """Answer an in-flight request exactly once; later attempts are ignored."""
        entry = self.inflight.pop(rid, None)
        if entry is None:
            return
        if entry.timer is not None:
            entry.timer.cancel()
        self.send(self._response(rid, outcome))

    # -- handshake (section 4) -----------------------------------------------------------------
    def _send_handshake(self, reply: dict[str, Any]) -> None:
        self._write(pack_frame(0, ENC_JSON, dumps(reply)))

    def _reject(self, code: str, message: str) -> None:
        log.info("connection %d: handshake rejected: %s", self.cid, code)
        self._send_handshake(
            {"reject": {"code": code, "message": message, "majors": OUR_MAJORS, "encodings": OUR_ENCODINGS}}
        )

    async def _read_hello_exact(self, n: int) -> bytes:
        remaining = self.opened_at + HELLO_TIMEOUT_S - self.loop.time()
        if remaining <= 0:
            raise TimeoutError
        return await asyncio.wait_for(self.reader.readexactly(n), remaining)

    async def handshake(self) -> bool:
        try:
            header = await self._read_hello_exact(HEADER.size)
            magic, major, enc, flags, length = HEADER.unpack(header)
            if magic != MAGIC:
                log.info("connection %d: bad magic in the first frame", self.cid)
                return False
            if enc not in KNOWN_ENCODING_IDS or flags != 0:
                self._reject("InvalidHello", "the Hello frame header is malformed")
                return False
            if length > HANDSHAKE_CAP:
                log.info("connection %d: Hello of %d bytes exceeds the 64 KiB cap", self.cid, length)
                return False
            payload = await self._read_hello_exact(length)
        except (TimeoutError, asyncio.TimeoutError):
            log.info("connection %d: no Hello within %g s", self.cid, HELLO_TIMEOUT_S)
            return False
        except (asyncio.IncompleteReadError, ConnectionError):
            log.info("connection %d: closed before the Hello", self.cid)
            return False
        if major != 0 or enc != ENC_JSON:
            self._reject("InvalidHello", "a Hello frame must carry major 0 and encoding JSON (1)")
            return False

        # Section 4.3, in order; stop at the first failure.
        try:
            hello = decode_hello(payload)
        except DecodeError as exc:
            self._reject("InvalidHello", f"the Hello could not be decoded: {exc}")
            return False
        if not hmac.compare_digest(hello.token.encode("utf-8"), self.token.encode("utf-8")):
            self._reject("Unauthenticated", "the token is wrong")
            return False
        common = set(hello.majors) & set(OUR_MAJORS)
        if not common:
            self._reject(
                "IncompatibleVersion",
                f"no common protocol major: gateway speaks {_fmt_majors(hello.majors)}, "
                f"provider speaks {_fmt_majors(OUR_MAJORS)}",
            )
            return False
        major_chosen = max(common)
        encoding = next((e for e in hello.encodings if e in OUR_ENCODINGS), None)
        if encoding is None:
            offered = json.dumps(hello.encodings[:16], ensure_ascii=False)[:300]
            self._reject(
                "NoCommonEncoding",
                f"no common encoding: gateway offers {offered}, provider speaks {json.dumps(OUR_ENCODINGS)}",
            )
            return False
        mf = hello.max_frame
        if not (MIN_FRAME <= mf <= MAX_FRAME and mf & (mf - 1) == 0):
            self._reject(
                "InvalidHello",
                f"max_frame {mf} is not a power of two from {MIN_FRAME} to {MAX_FRAME}",
            )
            return False

        # Unknown features are ignored; v1 defines none.
        self.peer_max_frame = mf
        # Section 4.4 sizing rule, rounded down.
        self.max_value_size = (min(mf, OWN_MAX_FRAME) - 65536) * 3 // 4
        self._send_handshake(
            {
                "accept": {
                    "major": major_chosen,
                    "encoding": encoding,
                    "provider": {"name": PROVIDER_NAME, "version": PROVIDER_VERSION},
                    "capabilities": {
                        "store": True,
                        "rotate": True,
                        "revoke": True,
                        "list": True,
                        "watch": True,
                        "versions_kept": VERSIONS_KEPT,
                        "max_value_size": self.max_value_size,
                    },
                    "features": [],
                    "max_frame": OWN_MAX_FRAME,
                }
            }
        )
        await self.drain()
        log.info("connection %d: handshake accepted (major %d, %s)", self.cid, major_chosen, encoding)
        return True

    # -- requests (section 5) -------------------------------------------------------------------
    async def request_loop(self) -> None:
        while True:
            try:
                header = await self.reader.readexactly(HEADER.size)
                magic, major, enc, flags, length = HEADER.unpack(header)
                if magic != MAGIC:
                    raise ProtocolFault("InvalidRequest", "bad magic")
                if enc not in KNOWN_ENCODING_IDS:
                    raise ProtocolFault("InvalidRequest", f"unknown encoding id {enc}")
                if flags != 0:
                    raise ProtocolFault("InvalidRequest", f"nonzero flags byte {flags:#04x}")
                if length > OWN_MAX_FRAME:  # checked before reading or allocating the payload
                    raise ProtocolFault(
                        "TooLarge",
                        f"frame of {length} bytes exceeds the cap of {OWN_MAX_FRAME} bytes",
                    )
                payload = await self.reader.readexactly(length)
                read_at = self.loop.time()
                if major != AGREED_MAJOR or enc != ENC_JSON:
                    raise ProtocolFault(
                        "InvalidRequest",
                        f"frame carries major {major} and encoding id {enc}; "
                        f"agreed were major {AGREED_MAJOR} and JSON (1)",
                    )
                try:
                    req = decode_request(payload)
                except DecodeError as exc:
                    raise ProtocolFault("InvalidRequest", f"the payload is not a Request: {exc}") from None
                if req.id in self.inflight:
                    raise ProtocolFault("InvalidRequest", f"request id {req.id} is already in flight")
            except (asyncio.IncompleteReadError, ConnectionError):
                log.info("connection %d: gateway closed the connection", self.cid)
                return  # transport failure: drop everything in flight, answer nothing
            except ProtocolFault as fault:
                log.warning("connection %d: protocol fault: %s", self.cid, fault.message)
                self.send({"abort": error_obj(fault.code, fault.message)})
                self.closed = True
                return
            if req.op == "goodbye":
                await self.goodbye(req.id)
                return
            self.dispatch(req, read_at)
            await self.drain()

    def dispatch(self, req: Request, read_at: float) -> None:
        rid = req.id
        # Section 7.2 step 1. Goodbye is exempt (handled before); see the README.
        if req.timeout_ms == 0:
            self.respond_err(rid, "DeadlineExceeded", "deadline of 0 ms passed")
            return
        if req.op == "cancel":
            self.cancel(rid, req.args["id"])
            return
        if req.op == "watch":
            self.start_watch(rid, req.args["prefix"])
            return
        entry = InFlight(rid, "op")
        self.inflight[rid] = entry
        deadline = read_at + req.timeout_ms / 1000.0
        entry.timer = self.loop.call_at(deadline, self.on_deadline, rid, req.timeout_ms)
        entry.task = self.loop.create_task(self.run_op(rid, req, deadline))
        self.tasks.add(entry.task)
        entry.task.add_done_callback(self.tasks.discard)

    def on_deadline(self, rid: int, timeout_ms: int) -> None:
        entry = self.inflight.get(rid)
        if entry is None or entry.kind != "op":
            return
        entry.timer = None
        if entry.task is not None:
            entry.task.cancel()
        self.finish(rid, {"err": error_obj("DeadlineExceeded", f"deadline of {timeout_ms} ms passed")})

    async def run_op(self, rid: int, req: Request, deadline: float) -> None:
        if self.loop.time() >= deadline:
            self.finish(rid, {"err": error_obj("DeadlineExceeded", f"deadline of {req.timeout_ms} ms passed")})
            return
        try:
            outcome: dict[str, Any] = {"ok": await self.execute(req)}
        except OpError as e:
            outcome = {"err": error_obj(e.code, e.message, e.op)}
        except asyncio.CancelledError:
            return  # whoever cancelled (Cancel, Goodbye, deadline, teardown) has answered
        except Exception as exc:
            log.error(
                "connection %d: request %d failed: %s\n%s",
                self.cid,
                rid,
                type(exc).__name__,
                "".join(traceback.format_tb(exc.__traceback__)),
            )
            outcome = {"err": error_obj("Internal", "internal error in the provider")}
        self.finish(rid, outcome)
        await self.drain()

    async def execute(self, req: Request) -> dict[str, Any]:
        """Section 7.2 steps 2 to 5. Every capability is declared, so step 2 never fails."""
        a = req.args
        op = req.op
        if op == "health":
            return {"health": {"status": "Ok", "detail": ""}}
        if op == "list":
            check_name(a["prefix"], what="prefix", allow_empty=True)
            entries, next_page = self.store.list(
                a["prefix"], a["page"], a["limit"], self.peer_max_frame - 8192
            )
            return {"listed": {"entries": entries, "next_page": next_page}}
        name = a["name"]
        check_name(name)
        if op in ("store", "rotate") and len(a["value"]) > self.max_value_size:
            raise OpError(
                "TooLarge",
                f"value of {len(a['value'])} bytes exceeds max_value_size of {self.max_value_size} bytes",
            )
        if op == "resolve":
            value, version = self.store.resolve(name, a["version"])
            return {"resolved": {"value": base64.b64encode(value).decode("ascii"), "version": version}}
        if op == "store":
            return {"stored": {"version": self.store.store(name, a["value"], a["create_only"], a["labels"])}}
        if op == "rotate":
            return {"rotated": {"version": self.store.rotate(name, a["value"], a["expected_version"])}}
        if op == "revoke":
            self.store.revoke(name)
            return {"revoked": {}}
        if op == "describe":
            return {"described": self.store.describe(name)}
        raise OpError("Internal", "unhandled operation")  # unreachable: decode_request checks ops

    def start_watch(self, rid: int, prefix: str) -> None:
        try:
            check_name(prefix, what="prefix", allow_empty=True)
        except OpError as e:
            self.respond_err(rid, e.code, e.message)
            return
        key = (self.cid, rid)
        self.inflight[rid] = InFlight(rid, "watch", watch_key=key)

        def on_change(name: str, change: str, version: str | None) -> None:
            if rid in self.inflight and not self.closed:
                self.send({"event": {"watch_id": rid, "name": name, "change": change, "version": version}})

        # Register and answer in one synchronous step: `watching` precedes every event.
        self.store.watch(key, prefix, on_change)
        self.respond_ok(rid, {"watching": {}})

    def cancel(self, rid: int, target: int) -> None:
        entry = self.inflight.get(target)
        found = entry is not None
        if entry is not None:
            if entry.kind == "watch":
                self.inflight.pop(target, None)
                self._drop(entry)  # no event for it after this point
            else:
                if entry.task is not None:
                    entry.task.cancel()
                # The Cancelled answer to N is written before the cancel_ack.
                self.finish(target, {"err": error_obj("Cancelled", "cancelled by the gateway")})
        self.respond_ok(rid, {"cancel_ack": {"found": found}})

    async def goodbye(self, rid: int) -> None:
        for tid, entry in list(self.inflight.items()):
            if entry.kind == "watch":
                self.inflight.pop(tid, None)
                self._drop(entry)
            else:
                if entry.task is not None:
                    entry.task.cancel()
                self.finish(tid, {"err": error_obj("Cancelled", "cancelled by goodbye")})
        self.respond_ok(rid, {"goodbye_ack": {}})  # the last frame
        self.closed = True
        await self.drain()
        log.info("connection %d: goodbye", self.cid)


def _fmt_majors(majors: list[int]) -> str:
    uniq = sorted(set(majors))
    if len(uniq) <= 32:
        return "[" + ", ".join(str(m) for m in uniq) + "]"
    return f"[{uniq[0]} .. {uniq[-1]}] ({len(uniq)} majors)"


# --------------------------------------------------------------------------------------------
# Process modes (section 9)
# --------------------------------------------------------------------------------------------


class StartupError(Exception):
    pass


STREAM_LIMIT = 2 * OWN_MAX_FRAME


async def _watch_parent(ppid: int, stop: asyncio.Event) -> None:
    while True:
        await asyncio.sleep(1.0)
        if os.getppid() != ppid:
            log.info("parent process went away; exiting")
            stop.set()
            return


def _install_stop_signals(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


async def run_spawn(path: str, token: str) -> int:
    loop = asyncio.get_running_loop()
    ppid = os.getppid()
    try:
        reader, writer = await asyncio.open_unix_connection(path, limit=STREAM_LIMIT)
    except OSError as exc:
        raise StartupError(f"cannot connect to {path}: {exc.strerror or type(exc).__name__}") from None
    stop = asyncio.Event()
    _install_stop_signals(loop, stop)
    conn = Connection(reader, writer, MemoryStore(), token, loop.time())
    serve = asyncio.create_task(conn.serve())
    stopper = asyncio.create_task(stop.wait())
    parent = asyncio.create_task(_watch_parent(ppid, stop))
    await asyncio.wait({serve, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if not serve.done():
        log.info("stopping")
        serve.cancel()
    for t in (stopper, parent):
        t.cancel()
    await asyncio.gather(serve, stopper, parent, return_exceptions=True)
    return 0


def read_token_file(path: str) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise StartupError(f"cannot open token file {path}: {exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if mode & 0o044:
            raise StartupError(
                f"token file {path} is readable by group or others (mode {stat.S_IMODE(mode):04o}); "
                "chmod 600 it"
            )
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(1 << 20)
    finally:
        os.close(fd)
    try:
        token = data.decode("utf-8").rstrip()
    except UnicodeDecodeError:
        raise StartupError(f"token file {path} is not UTF-8") from None
    if not token:
        raise StartupError(f"token file {path} is empty")
    return token


def make_listen_socket(path: str) -> socket.socket:
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        try:
            os.makedirs(directory, mode=0o700)
            os.chmod(directory, 0o700)
        except OSError as exc:
            raise StartupError(f"cannot create socket directory {directory}: {exc.strerror}") from None
    elif stat.S_IMODE(os.stat(directory).st_mode) & 0o077:
        log.warning("socket directory %s is accessible by group or others", directory)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise StartupError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(path)
        except OSError:
            os.unlink(path)  # a stale socket left by a dead process
        else:
            raise StartupError(f"{path} is in use by another process")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {path}: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(64)
    sock.setblocking(False)
    return sock


async def run_listen(sock: socket.socket, path: str, token: str) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    _install_stop_signals(loop, stop)
    store = MemoryStore()
    tasks: set[asyncio.Task[Any]] = set()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        opened = loop.time()
        task = asyncio.current_task()
        if task is not None:
            tasks.add(task)
        try:
            await Connection(reader, writer, store, token, opened).serve()
        except asyncio.CancelledError:
            pass
        finally:
            if task is not None:
                tasks.discard(task)

    server = await asyncio.start_unix_server(on_client, sock=sock, limit=STREAM_LIMIT)
    log.info("listening on %s", path)
    try:
        await stop.wait()
    finally:
        log.info("stopping")
        server.close()
        for t in list(tasks):
            t.cancel()
        if tasks:
            await asyncio.wait(list(tasks), timeout=3.0)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    return 0


USAGE = (
    "usage: keyhole_provider.py --connect SOCKET   (token in KEYHOLE_PROVIDER_TOKEN)\n"
    "       keyhole_provider.py --listen SOCKET --token-file FILE"
)


def parse_args(argv: list[str]) -> dict[str, str]:
    opts: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(USAGE, file=sys.stderr)
            raise SystemExit(0)
        name, eq, value = arg.partition("=")
        if name not in ("--connect", "--listen", "--token-file"):
            raise StartupError(f"unknown argument {arg!r}")
        if not eq:
            if i + 1 >= len(argv):
                raise StartupError(f"{name} needs a value")
            value = argv[i + 1]
            i += 1
        if name in opts:
            raise StartupError(f"{name} given twice")
        if not value:
            raise StartupError(f"{name} needs a non-empty value")
        opts[name] = value
        i += 1
    if ("--connect" in opts) == ("--listen" in opts):
        raise StartupError("give exactly one of --connect SOCKET or --listen SOCKET")
    if "--listen" in opts and "--token-file" not in opts:
        raise StartupError("--listen needs --token-file FILE")
    if "--connect" in opts and "--token-file" in opts:
        raise StartupError("--token-file is for --listen; spawn mode reads KEYHOLE_PROVIDER_TOKEN")
    return opts


def main(argv: list[str]) -> int:
    sys.stdout = sys.stderr  # stdout is not used by the protocol: keep it empty
    level = logging.DEBUG if os.environ.get("KEYHOLE_LOG", "").lower() == "debug" else logging.INFO
    logging.basicConfig(
        stream=sys.stderr, level=level, format=f"{PROVIDER_NAME}[%(process)d] %(levelname)s %(message)s"
    )
    # Read the token and remove it from the environment so no child could inherit it.
    env_token = os.environ.pop("KEYHOLE_PROVIDER_TOKEN", None)
    try:
        opts = parse_args(argv)
        if "--connect" in opts:
            if env_token is None:
                raise StartupError("KEYHOLE_PROVIDER_TOKEN is not set")
            if env_token == "":
                raise StartupError("KEYHOLE_PROVIDER_TOKEN is empty")
            return asyncio.run(run_spawn(opts["--connect"], env_token))
        token = read_token_file(opts["--token-file"])
        sock = make_listen_socket(opts["--listen"])
        return asyncio.run(run_listen(sock, opts["--listen"], token))
    except StartupError as exc:
        print(f"{PROVIDER_NAME}: error: {exc}", file=sys.__stderr__, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
