"""The webhook relay under hostile callers (issue 11 item 6, SPEC §11): a real relay server on loopback, forwarding to
a real `AirflowClient` that posts into a tiny fake Airflow API (the sink). Every resource an unauthenticated request
can hold is bounded (body, time, concurrency), every bad input gets one clear 4xx, and valid deliveries get through a
bounded flood of forged and slow-loris connections."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pipeline_support import write_params

pytestmark = pytest.mark.pipeline
SECRET = "relay-security-secret"
FAMILY = "sec"


# -- a fake Airflow API: the relay's AirflowClient logs in with a static token, looks the asset up, posts events
@dataclass
class Sink:
    events: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


@pytest.fixture
def sink() -> Iterator[tuple[str, Sink]]:
    state = Sink()

    class Handler(BaseHTTPRequestHandler):
        def _json(self, status: int, payload: Any) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.headers.get("Authorization") != "Bearer sink-token":
                self._json(401, {"detail": "unauthenticated"})
            elif self.path.startswith("/api/v2/assets?"):
                self._json(200, {"assets": [{"id": 7, "name": f"sarmerge_family_{FAMILY}"}]})
            else:
                self._json(404, {})

        def do_POST(self) -> None:
            payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path == "/api/v2/assets/events" and payload.get("asset_id") == 7:
                with state.lock:
                    state.events.append(payload["extra"])
                self._json(200, {"id": len(state.events)})
            else:
                self._json(404, {})

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", state
    server.shutdown()
    server.server_close()


def start_relay(tmp_path: Path, airflow_url: str, **limits: Any) -> tuple[Any, Any, int]:
    from tasks.params import load_params
    from tasks.relay import AirflowClient, Relay, make_server

    relay_cfg = {"max_age_s": 300, **limits}
    params = load_params(write_params(tmp_path / "params.yaml", root=tmp_path / "root", family=FAMILY,
                                      trigger={"watcher": False, "poll_interval_s": 5, "relay": relay_cfg}))
    relay = Relay(params, SECRET, AirflowClient(airflow_url, token="sink-token").post_event)
    server = make_server(relay, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return relay, server, server.server_port


@pytest.fixture
def relay_server(tmp_path: Path, sink: tuple[str, Sink]) -> Iterator[tuple[Any, int, Sink]]:
    relay, server, port = start_relay(tmp_path, sink[0], read_timeout_s=2.0, max_connections=8)
    yield relay, port, sink[1]
    server.shutdown()
    server.server_close()


def signed(version: str = "3", *, name: str = f"{FAMILY}-math", body: bytes | None = None,
           secret: str = SECRET) -> tuple[bytes, dict[str, str]]:
    from tasks.relay import sign

    if body is None:
        body = json.dumps({"entity": "model_version", "action": "created",
                           "data": {"name": name, "version": version, "tags": {"sarmerge.kind": "rlvr"}}}).encode()
    delivery, ts = str(uuid.uuid4()), str(int(time.time()))
    return body, {"X-MLflow-Delivery-Id": delivery, "X-MLflow-Timestamp": ts,
                  "X-MLflow-Signature": sign(secret, delivery, ts, body), "Content-Type": "application/json"}


def raw_request(port: int, head: bytes, body: bytes = b"", *, timeout: float = 10.0) -> tuple[int, dict, float]:
    """Send raw bytes (headers exactly as given) and read the answer: (status, JSON body, seconds it took)."""
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    payload = rest.partition(b"\r\n\r\n")[2]
    return int(status_line.split()[1]), json.loads(payload or b"{}"), time.monotonic() - t0


def head(headers: dict[str, str] | None = None, *, extra: bytes = b"") -> bytes:
    lines = [b"POST /webhook HTTP/1.1", b"Host: 127.0.0.1"]
    lines += [f"{k}: {v}".encode() for k, v in (headers or {}).items()]
    return b"\r\n".join(lines) + b"\r\n" + extra + b"\r\n"


def post_signed(port: int, body: bytes, headers: dict[str, str]) -> tuple[int, dict, float]:
    return raw_request(port, head({**headers, "Content-Length": str(len(body))}), body)


# -- one test per bad input -------------------------------------------------------------------------------------------
def test_negative_content_length_is_refused_without_reading(relay_server) -> None:
    _, port, sink = relay_server
    # the old relay read 60 MiB here before checking anything; now the answer comes before any body is sent
    status, answer, _ = raw_request(port, head({"Content-Length": "-1"}))
    assert status == 400 and "Content-Length" in answer["reason"]
    assert sink.events == []


@pytest.mark.parametrize(("headers", "status", "reason"), [
    ({}, 411, "Content-Length"),
    ({"Content-Length": "10", "Transfer-Encoding": "chunked"}, 411, "chunked"),
    ({"Transfer-Encoding": "chunked"}, 411, "chunked"),
    ({"Content-Length": "1e3"}, 400, "Content-Length"),
    ({"Content-Length": str(2 << 20)}, 413, "too large"),
])
def test_missing_chunked_malformed_and_oversized_bodies_are_refused_before_reading(relay_server, headers, status,
                                                                                   reason) -> None:
    _, port, sink = relay_server
    # no body follows the headers: an answer proves nothing was waited for
    got, answer, took = raw_request(port, head(headers))
    assert (got, reason in answer["reason"]) == (status, True)
    assert took < 2.0  # well under the 2 s read deadline: refused, not timed out
    assert sink.events == []


def test_non_ascii_signature_is_a_401_not_a_crash(relay_server) -> None:
    _, port, sink = relay_server
    body, headers = signed()
    unsigned = {k: v for k, v in headers.items() if k != "X-MLflow-Signature"}
    raw_head = head(unsigned | {"Content-Length": str(len(body))}, extra="X-MLflow-Signature: v1,é€ü\r\n".encode())
    status, answer, _ = raw_request(port, raw_head, body)
    assert (status, answer["reason"]) == (401, "malformed signature")
    # the server still serves: the same delivery signed properly goes through
    assert post_signed(port, body, headers)[:2] == (200, {"status": "accepted", "asset": f"sarmerge_family_{FAMILY}",
                                                          "name": f"{FAMILY}-math", "version": "3"})
    assert len(sink.events) == 1


def test_a_folded_delivery_id_cannot_inject_a_log_line(relay_server, caplog: pytest.LogCaptureFixture) -> None:
    _, port, sink = relay_server
    body, headers = signed()
    forged_line = "INFO sarmerge.relay: relayed sec-math/99 -> asset sarmerge_family_sec"
    raw_head = head({k: v for k, v in headers.items() if k != "X-MLflow-Delivery-Id"} |
                    {"Content-Length": str(len(body))},
                    extra=f"X-MLflow-Delivery-Id: abc\r\n {forged_line}\r\n".encode())
    with caplog.at_level(logging.INFO, logger="sarmerge.relay"):
        status, answer, _ = raw_request(port, raw_head, body)
    assert (status, answer["reason"]) == (401, "malformed delivery id")
    messages = [r.getMessage() for r in caplog.records if r.name == "sarmerge.relay"]
    assert messages, "the rejection is logged"
    assert all("\n" not in m and "\r" not in m for m in messages), messages
    assert sink.events == []


def test_deeply_nested_json_is_a_400_not_a_recursion_error(relay_server) -> None:
    _, port, sink = relay_server
    nested = b'{"entity": "model_version", "action": "created", "data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    status, answer, _ = post_signed(port, *signed(body=nested))
    assert status == 400 and "nested deeper" in answer["reason"]
    # brackets inside strings do not count
    text = json.dumps({"entity": "model_version", "action": "created",
                       "data": {"name": f"{FAMILY}-code", "version": "5", "note": "[" * 5000}}).encode()
    assert post_signed(port, *signed(body=text))[0] == 200
    assert [e["version"] for e in sink.events] == ["5"]


@pytest.mark.parametrize("version", ["²", "٣", "3\n", "-1", "0", "1" * 11, "3.0", True])
def test_versions_int_would_choke_on_are_refused(relay_server, version: Any) -> None:
    _, port, sink = relay_server
    body = json.dumps({"entity": "model_version", "action": "created",
                       "data": {"name": f"{FAMILY}-math", "version": version}}).encode()
    status, answer, _ = post_signed(port, *signed(body=body))
    assert status == 400, answer
    assert sink.events == []


@pytest.mark.parametrize("version", ["²", "٣", "3\n", "-1", "01"])
def test_plan_refuses_the_same_versions_with_one_clear_error(version: str) -> None:
    from sarmerge.errors import SarmergeError
    from tasks.plan import parse_events

    with pytest.raises(SarmergeError, match=r"--events\[0\]\.version"):
        parse_events(json.dumps([{"name": f"{FAMILY}-math", "version": version}]))
    assert parse_events('[{"name": "sec-math", "version": 12}]') == [("sec-math", "12")]


@pytest.mark.parametrize("name", [f"{FAMILY}-math\n", f"{FAMILY}-math\x1b[2J", "x" * 5000])
def test_names_that_only_a_lax_check_passes_are_not_forwarded(relay_server, name: str) -> None:
    _, port, sink = relay_server
    status, answer, _ = post_signed(port, *signed(name=name))
    assert (status, answer["status"]) == (200, "ignored")
    assert "\n" not in answer["reason"] and "\x1b" not in answer["reason"]
    assert sink.events == []


def test_slow_headers_are_cut_off_at_the_read_deadline(relay_server) -> None:
    relay, port, _ = relay_server
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /webhook HTTP/1.1\r\n")
        closed = False
        for _ in range(40):  # one header byte every 0.25 s: never idle long enough for a per-read timeout
            try:
                s.sendall(b"X")
            except OSError:
                closed = True
                break
            s.settimeout(0.25)
            try:
                if s.recv(1024) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except OSError:
                closed = True
                break
    took = time.monotonic() - t0
    assert closed and took < 2.0 + 2.0, f"connection still open after {took:.1f}s (read deadline 2 s)"
    assert relay.stats["cut_off"] >= 1


def test_connections_beyond_the_limit_get_503_at_once(tmp_path: Path, sink) -> None:
    relay, server, port = start_relay(tmp_path, sink[0], read_timeout_s=5.0, max_connections=2)
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]
    try:
        time.sleep(0.3)  # both accepted and holding a slot
        status, answer, took = raw_request(port, head({"Content-Length": "0"}))
        assert (status, answer["status"]) == (503, "busy") and took < 2.0
        assert relay.stats["busy"] == 1
    finally:
        for s in idle:
            s.close()
        server.shutdown()
        server.server_close()


# -- the flood -----------------------------------------------------------------------------------------------------
def test_valid_deliveries_get_through_a_bounded_flood(tmp_path: Path, sink) -> None:
    """200 idle slow-loris connections plus 200 forged deliveries (bad signature, negative and oversized lengths),
    while 20 valid signed deliveries are sent by a client that retries on 503 and resets, as MLflow's delivery does
    (urllib3 Retry on 429/5xx, Retry-After honoured). All 20 reach the fake Airflow; no connection outlives the read
    deadline by much; the relay's thread count stays bounded by max_connections."""
    read_timeout, max_connections = 2.0, 16
    relay, server, port = start_relay(tmp_path, sink[0], read_timeout_s=read_timeout,
                                      max_connections=max_connections, backlog=256)
    state = sink[1]
    stop = threading.Event()
    loris_lifetimes: list[float] = []
    lock = threading.Lock()

    def loris() -> None:
        for _ in range(3):  # reconnects twice after being cut off: 600 slow connections in all, at most 20 s
            t0 = time.monotonic()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    s.sendall(b"POST /webhook HTTP/1.1\r\nHost: x\r\n")
                    while not stop.is_set() and time.monotonic() - t0 < 20:
                        try:
                            if s.recv(1024) == b"":
                                break
                        except TimeoutError:
                            s.sendall(b"X")  # keep it alive: one byte per second
            except OSError:
                pass
            with lock:
                loris_lifetimes.append(time.monotonic() - t0)
            if stop.is_set():
                return

    def forged(i: int) -> int:
        for _ in range(5):  # a persistent attacker comes back after a 503
            status = forged_once(i)
            if status not in (503, -1):
                return status
            time.sleep(0.3)
        return status

    def forged_once(i: int) -> int:
        body, headers = signed(version=str(i + 1), secret="not-the-secret")
        if i % 10 == 0:
            headers["Content-Length"] = "-1"
        elif i % 10 == 1:
            headers["Content-Length"] = str(64 << 20)
        else:
            headers["Content-Length"] = str(len(body))
        try:
            return raw_request(port, head(headers), body, timeout=10)[0]
        except (OSError, ValueError, IndexError):
            return -1  # reset while the relay was full: what a flood gets

    def valid(i: int) -> float:
        body, headers = signed(version=str(1000 + i))
        t0 = time.monotonic()
        while time.monotonic() - t0 < 90:
            try:
                status, answer, _ = post_signed(port, body, headers)
                if status == 200:
                    assert answer["status"] in ("accepted", "duplicate"), answer
                    return time.monotonic() - t0
            except (OSError, ValueError, IndexError):
                pass
            time.sleep(0.5)
        raise AssertionError(f"valid delivery {i} did not get through in 90 s")

    threads_before = threading.active_count()
    peak_threads = 0
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as attackers, \
            concurrent.futures.ThreadPoolExecutor(max_workers=4) as senders:
        lorises = [threading.Thread(target=loris, daemon=True) for _ in range(200)]
        for t in lorises:
            t.start()
        time.sleep(0.5)
        forged_results = [attackers.submit(forged, i) for i in range(200)]
        valid_results = [senders.submit(valid, i) for i in range(20)]
        while not all(f.done() for f in valid_results):
            peak_threads = max(peak_threads, threading.active_count())
            time.sleep(0.1)
        waits = [f.result() for f in valid_results]
        statuses = [f.result() for f in forged_results]
        stop.set()
        for t in lorises:
            t.join(timeout=10)
    server.shutdown()
    server.server_close()

    assert sorted(e["version"] for e in state.events) == sorted(str(1000 + i) for i in range(20))
    assert all(s in (400, 401, 411, 413, 503, -1) for s in statuses), sorted(set(statuses))
    assert statuses.count(401) + statuses.count(400) + statuses.count(413) > 0
    assert relay.stats["accepted"] == 20
    # time bound: a loris is cut off at the read deadline (or refused at once), never held until it gives up
    assert loris_lifetimes and max(loris_lifetimes) < read_timeout + 5, max(loris_lifetimes)
    # concurrency bound: the test's own 200 loris + 12 pool threads, plus at most max_connections relay handlers
    assert peak_threads <= threads_before + 200 + 12 + max_connections + 4, peak_threads
    print(f"flood: 20 valid deliveries through in {max(waits):.1f}s max (median {sorted(waits)[10]:.1f}s); "
          f"relay stats {relay.stats}")
