"""Smoke tests for the example provider. Standard library only.

Run: python3 -m unittest discover -s examples/python-provider -v

Each test starts the provider the way the gateway does in spawn mode (PROTOCOL.md section 9.1):
a private 0700 directory, a listening Unix socket in it, the provider started with
`--connect SOCKET` and the token in KEYHOLE_PROVIDER_TOKEN. Every wait has a timeout.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
import unittest
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
PROVIDER = os.path.join(HERE, "keyhole_provider.py")
HEADER = struct.Struct(">4sHBBI")
TIMEOUT = 10.0  # seconds, for every socket operation and process wait


def frame(major: int, payload: bytes, encoding_id: int = 1, flags: int = 0, length: int | None = None) -> bytes:
    n = len(payload) if length is None else length
    return HEADER.pack(b"KHOL", major, encoding_id, flags, n) + payload


def b64(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


class Peer:
    """The gateway side of one connection."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(TIMEOUT)
        self.next_id = 1
        self.pending: list[dict[str, Any]] = []  # messages read but not yet consumed

    def read_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError("connection closed")
            buf += chunk
        return bytes(buf)

    def read_frame(self) -> tuple[int, int, bytes]:
        magic, major, enc, flags, length = HEADER.unpack(self.read_exact(HEADER.size))
        assert magic == b"KHOL" and flags == 0, "bad frame header from the provider"
        return major, enc, self.read_exact(length)

    def read_message(self, major: int = 1) -> dict[str, Any]:
        got_major, enc, payload = self.read_frame()
        assert got_major == major and enc == 1, (got_major, enc)
        return json.loads(payload)

    def expect_eof(self) -> None:
        data = self.sock.recv(1)
        assert data == b"", "expected the provider to close the connection"

    def hello(self, token: str, **overrides: Any) -> dict[str, Any]:
        msg = {"majors": [1], "encodings": ["bincode", "json"], "features": [], "token": token,
               "max_frame": 1048576}
        msg.update(overrides)
        self.sock.sendall(frame(0, json.dumps(msg).encode()))
        return self.read_message(major=0)

    def send(self, op: dict[str, Any], timeout_ms: int = 5000, rid: int | None = None) -> int:
        if rid is None:
            rid, self.next_id = self.next_id, self.next_id + 1
        payload = json.dumps({"id": rid, "timeout_ms": timeout_ms, "op": op}, separators=(",", ":"))
        self.sock.sendall(frame(1, payload.encode()))
        return rid

    def response(self, rid: int) -> dict[str, Any]:
        """The outcome of request rid; other messages are kept for later."""
        while True:
            for i, msg in enumerate(self.pending):
                if "response" in msg and msg["response"]["id"] == rid:
                    del self.pending[i]
                    return msg["response"]["outcome"]
            self.pending.append(self.read_message())

    def event(self) -> dict[str, Any]:
        while True:
            for i, msg in enumerate(self.pending):
                if "event" in msg:
                    del self.pending[i]
                    return msg["event"]
            self.pending.append(self.read_message())

    def call(self, op: dict[str, Any], timeout_ms: int = 5000) -> dict[str, Any]:
        return self.response(self.send(op, timeout_ms))

    def ok(self, op: dict[str, Any]) -> dict[str, Any]:
        outcome = self.call(op)
        assert "ok" in outcome, outcome
        return outcome["ok"]

    def err(self, op: dict[str, Any], code: str, timeout_ms: int = 5000) -> dict[str, Any]:
        outcome = self.call(op, timeout_ms)
        assert "err" in outcome and outcome["err"]["code"] == code, (code, outcome)
        retryable = code in ("Locked", "Unavailable", "DeadlineExceeded")
        assert outcome["err"]["retryable"] is retryable, outcome
        return outcome["err"]


class SpawnedProvider:
    def __init__(self, token: str | None = None, args: list[str] | None = None) -> None:
        self.token = token if token is not None else "tok-" + secrets.token_hex(16)
        self.dir = tempfile.mkdtemp(prefix="kh-")  # mkdtemp creates it 0700
        os.chmod(self.dir, 0o700)
        self.path = os.path.join(self.dir, "p.sock")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(1)
        self.listener.settimeout(TIMEOUT)
        env = dict(os.environ, KEYHOLE_PROVIDER_TOKEN=self.token)
        self.proc = subprocess.Popen(
            [sys.executable, PROVIDER, *(args or []), "--connect", self.path],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        conn, _ = self.listener.accept()
        self.peer = Peer(conn)

    def finish(self) -> tuple[int, bytes, bytes]:
        """Wait for the provider to exit; return (status, stdout, stderr)."""
        out, err = self.proc.communicate(timeout=TIMEOUT)
        return self.proc.returncode, out, err

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=TIMEOUT)
        self.peer.sock.close()
        self.listener.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class SpawnModeTest(unittest.TestCase):
    def spawn(self) -> SpawnedProvider:
        p = SpawnedProvider()
        self.addCleanup(p.close)
        return p

    def handshake(self, p: SpawnedProvider) -> dict[str, Any]:
        reply = p.peer.hello(p.token, features=["grease-" + secrets.token_hex(4)], unknown_field=1)
        self.assertIn("accept", reply, reply)
        return reply["accept"]

    def assert_clean_exit(self, p: SpawnedProvider, canaries: list[bytes] = ()) -> bytes:
        status, out, err = p.finish()
        self.assertEqual(status, 0, err.decode(errors="replace"))
        self.assertEqual(out, b"", "the provider wrote to stdout")
        for c in canaries:
            for form in (c, b64(c).encode(), c.hex().encode()):
                self.assertNotIn(form, err, "a secret value leaked into stderr")
        return err

    def test_round_trip(self) -> None:
        p = self.spawn()
        ack = self.handshake(p)
        self.assertEqual((ack["major"], ack["encoding"], ack["features"]), (1, "json", []))
        caps = ack["capabilities"]
        self.assertEqual(caps["versions_kept"], 10)
        self.assertTrue(all(caps[k] for k in ("store", "rotate", "revoke", "list", "watch")))
        self.assertLessEqual(caps["max_value_size"], (min(1048576, ack["max_frame"]) - 65536) * 3 // 4)

        peer = p.peer
        v1 = b"canary-one-\x00\xff" + secrets.token_bytes(8)
        v2 = b"canary-two-" + secrets.token_bytes(8)
        name = "smoke/db password"
        stored = peer.ok({"store": {"name": name, "value": b64(v1), "create_only": True,
                                    "labels": {"team": "infra"}}})
        ver1 = stored["stored"]["version"]
        self.assertEqual(peer.ok({"resolve": {"name": name, "version": None}}),
                         {"resolved": {"value": b64(v1), "version": ver1}})
        ver2 = peer.ok({"rotate": {"name": name, "value": b64(v2), "expected_version": ver1}})["rotated"]["version"]
        self.assertNotEqual(ver1, ver2)
        self.assertEqual(peer.ok({"resolve": {"name": name}})["resolved"], {"value": b64(v2), "version": ver2})
        self.assertEqual(peer.ok({"resolve": {"name": name, "version": ver1}})["resolved"]["value"], b64(v1))
        desc = peer.ok({"describe": {"name": name}})["described"]
        self.assertEqual((desc["state"], desc["current_version"], desc["labels"]), ("active", ver2, {"team": "infra"}))
        self.assertEqual([v["version"] for v in desc["versions"]], [ver1, ver2])
        self.assertEqual(peer.ok({"revoke": {"name": name}}), {"revoked": {}})
        self.assertEqual(peer.ok({"revoke": {"name": name}}), {"revoked": {}})  # idempotent
        peer.err({"resolve": {"name": name, "version": None}}, "Revoked")
        peer.err({"resolve": {"name": name, "version": ver1}}, "Revoked")
        desc = peer.ok({"describe": {"name": name}})["described"]
        self.assertEqual((desc["state"], desc["current_version"]), ("revoked", None))
        # Rotate brings it back; pre-revoke versions stay unreadable.
        ver3 = peer.ok({"rotate": {"name": name, "value": b64(v1), "expected_version": None}})["rotated"]["version"]
        self.assertNotIn(ver3, (ver1, ver2))
        peer.err({"resolve": {"name": name, "version": ver2}}, "Revoked")

        rid = peer.send({"goodbye": {}})
        self.assertEqual(peer.read_message(), {"response": {"id": rid, "outcome": {"ok": {"goodbye_ack": {}}}}})
        peer.expect_eof()
        self.assert_clean_exit(p, [v1, v2])

    def test_semantics(self) -> None:
        p = self.spawn()
        ack = self.handshake(p)
        peer = p.peer
        max_size = ack["capabilities"]["max_value_size"]
        canary = b"canary-" + secrets.token_bytes(12)
        peer.err({"resolve": {"name": "nope", "version": None}}, "NotFound")
        peer.err({"rotate": {"name": "nope", "value": "", "expected_version": None}}, "NotFound")
        peer.err({"revoke": {"name": "nope"}}, "NotFound")
        peer.err({"describe": {"name": "nope"}}, "NotFound")
        # timeout 0: DeadlineExceeded and no effect
        peer.err({"store": {"name": "t0", "value": b64(canary), "create_only": False, "labels": {}}},
                 "DeadlineExceeded", timeout_ms=0)
        peer.err({"describe": {"name": "t0"}}, "NotFound")
        # names
        for bad in ("", "a\nb", "x" * 1025, "\u0085"):
            e = peer.err({"resolve": {"name": bad, "version": None}}, "InvalidRequest")
            self.assertIsNone(e["op"])
        peer.err({"resolve": {"name": "\u00e9" * 512, "version": None}}, "NotFound")  # 1024 bytes: valid
        peer.err({"resolve": {"name": "\u00e9" * 513, "version": None}}, "InvalidRequest")
        # empty and non-UTF-8 values round-trip; create_only; conflict; pinned versions
        v = peer.ok({"store": {"name": "e", "value": "", "create_only": True, "labels": {}}})["stored"]["version"]
        self.assertEqual(peer.ok({"resolve": {"name": "e", "version": None}})["resolved"]["value"], "")
        peer.err({"store": {"name": "e", "value": b64(canary), "create_only": True, "labels": {}}}, "AlreadyExists")
        e = peer.err({"rotate": {"name": "e", "value": b64(canary), "expected_version": v + "x"}}, "Conflict")
        peer.err({"resolve": {"name": "e", "version": "999"}}, "VersionUnavailable")
        versions = [v]
        for i in range(11):
            versions.append(peer.ok({"rotate": {"name": "e", "value": b64(bytes([i])), "expected_version": None}})["rotated"]["version"])
        peer.err({"resolve": {"name": "e", "version": versions[1]}}, "VersionUnavailable")  # 12 written, 10 kept
        self.assertEqual(peer.ok({"resolve": {"name": "e", "version": versions[2]}})["resolved"]["value"], b64(bytes([1])))
        # size limit
        big = b"\x01" * (max_size + 1)
        peer.err({"store": {"name": "big", "value": b64(big), "create_only": False, "labels": {}}}, "TooLarge")
        full = secrets.token_bytes(max_size)
        peer.ok({"store": {"name": "big", "value": b64(full), "create_only": False, "labels": {}}})
        self.assertEqual(peer.ok({"resolve": {"name": "big", "version": None}})["resolved"]["value"], b64(full))
        # list paging, byte order
        names = ["ls/b", "ls/a", "ls/\u00e9", "ls/Z", "ls/a/1"]
        for n in names:
            peer.ok({"store": {"name": n, "value": "", "create_only": True, "labels": {}}})
        seen, page = [], None
        while True:
            listed = peer.ok({"list": {"prefix": "ls/", "page": page, "limit": 2}})["listed"]
            self.assertLessEqual(len(listed["entries"]), 2)
            seen += [d["name"] for d in listed["entries"]]
            page = listed["next_page"]
            if page is None:
                break
        self.assertEqual(seen, sorted(names, key=lambda s: s.encode()))
        peer.err({"list": {"prefix": "ls/", "page": "forged", "limit": 0}}, "InvalidRequest")
        # 64 concurrent requests, all answered
        ids = [peer.send({"health": {}}) for _ in range(64)]
        for rid in ids:
            self.assertEqual(peer.response(rid), {"ok": {"health": {"status": "Ok", "detail": ""}}})
        # watch, cancel
        wid = peer.send({"watch": {"prefix": "w/"}})
        self.assertEqual(peer.response(wid), {"ok": {"watching": {}}})
        ver = peer.ok({"store": {"name": "w/x", "value": b64(canary), "create_only": False, "labels": {}}})["stored"]["version"]
        self.assertEqual(peer.event(), {"watch_id": wid, "name": "w/x", "change": "updated", "version": ver})
        peer.ok({"revoke": {"name": "w/x"}})
        self.assertEqual(peer.event(), {"watch_id": wid, "name": "w/x", "change": "revoked", "version": None})
        self.assertEqual(peer.ok({"cancel": {"id": wid}}), {"cancel_ack": {"found": True}})
        self.assertEqual(peer.ok({"cancel": {"id": 123456}}), {"cancel_ack": {"found": False}})
        peer.ok({"goodbye": {}})
        peer.expect_eof()
        self.assertEqual(peer.pending, [])  # no event after the watch was cancelled
        self.assert_clean_exit(p, [canary, full[:32]])

    def test_handshake_rejects(self) -> None:
        cases = [
            ({"token": "wrong"}, "Unauthenticated"),
            ({"majors": [7, 9]}, "IncompatibleVersion"),
            ({"encodings": ["bincode", "xml"]}, "NoCommonEncoding"),
            ({"max_frame": 1000}, "InvalidHello"),
        ]
        for overrides, code in cases:
            with self.subTest(code=code):
                p = self.spawn()
                fields = dict(overrides)
                reply = p.peer.hello(fields.pop("token", p.token), **fields)
                self.assertEqual(reply["reject"]["code"], code)
                self.assertEqual(reply["reject"]["majors"], [1])
                self.assertNotIn(p.token, json.dumps(reply))
                if code == "IncompatibleVersion":
                    self.assertIn("[7, 9]", reply["reject"]["message"])
                p.peer.expect_eof()
                self.assert_clean_exit(p)

    def test_protocol_faults(self) -> None:
        bad_frames = [
            (frame(1, b"", length=16 * 1024 * 1024), "TooLarge"),
            (frame(1, b'{"id":1,"timeout_ms":5000,"op":{"explode":{}}}'), "InvalidRequest"),
            (frame(1, b'{"id":1,"id":2,"timeout_ms":5000,"op":{"health":{}}}'), "InvalidRequest"),
            (frame(1, b'{"id":1,"timeout_ms":5000,"op":{"health":{}}}', flags=1), "InvalidRequest"),
            (frame(2, b'{"id":1,"timeout_ms":5000,"op":{"health":{}}}'), "InvalidRequest"),
        ]
        for data, code in bad_frames:
            with self.subTest(code=code, header=data[:12].hex()):
                p = self.spawn()
                self.handshake(p)
                p.peer.sock.sendall(data)
                msg = p.peer.read_message()
                self.assertEqual(msg["abort"]["code"], code)
                self.assertEqual((msg["abort"]["retryable"], msg["abort"]["op"]), (False, None))
                p.peer.expect_eof()
                self.assert_clean_exit(p)

    def test_eof_exits_zero(self) -> None:
        p = self.spawn()
        self.handshake(p)
        p.peer.sock.close()
        self.assert_clean_exit(p)

    def test_missing_token_exits_one(self) -> None:
        env = {k: v for k, v in os.environ.items() if k != "KEYHOLE_PROVIDER_TOKEN"}
        proc = subprocess.run([sys.executable, PROVIDER, "--connect", "/nonexistent/p.sock"], env=env,
                              capture_output=True, timeout=TIMEOUT)
        self.assertEqual(proc.returncode, 1)
        self.assertEqual(proc.stdout, b"")
        self.assertEqual(len(proc.stderr.strip().splitlines()), 1)


class ConnectModeTest(unittest.TestCase):
    def test_listen_and_sigterm(self) -> None:
        d = tempfile.mkdtemp(prefix="kh-")
        self.addCleanup(shutil.rmtree, d, True)
        token = "tok-" + secrets.token_hex(16)
        token_file = os.path.join(d, "token")
        with open(token_file, "w") as f:
            f.write(token + "\n")
        os.chmod(token_file, 0o644)
        sock_path = os.path.join(d, "run", "p.sock")
        cmd = [sys.executable, PROVIDER, "--listen", sock_path, "--token-file", token_file]
        bad = subprocess.run(cmd, capture_output=True, timeout=TIMEOUT)
        self.assertEqual(bad.returncode, 1, "a group-readable token file must be refused")
        os.chmod(token_file, 0o600)

        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.addCleanup(lambda: proc.poll() is None and (proc.kill(), proc.communicate(timeout=TIMEOUT)))
        deadline = time.monotonic() + TIMEOUT
        while not os.path.exists(sock_path):
            self.assertIsNone(proc.poll(), "the provider exited early")
            self.assertLess(time.monotonic(), deadline, "socket never appeared")
            time.sleep(0.05)
        self.assertEqual(stat.S_IMODE(os.stat(sock_path).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(sock_path)).st_mode), 0o700)
        for _ in range(2):  # connections are independent; Goodbye ends only one
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(TIMEOUT)
            s.connect(sock_path)
            peer = Peer(s)
            self.assertIn("accept", peer.hello(token))
            peer.ok({"store": {"name": "k", "value": "", "create_only": False, "labels": {}}})
            peer.ok({"goodbye": {}})
            peer.expect_eof()
            s.close()
        proc.send_signal(signal.SIGTERM)
        out, _err = proc.communicate(timeout=TIMEOUT)
        self.assertEqual(proc.returncode, 0)
        self.assertEqual(out, b"")
        self.assertFalse(os.path.exists(sock_path), "the socket file was not removed")


if __name__ == "__main__":
    unittest.main()
