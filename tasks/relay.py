"""Webhook relay: MLflow `model_version.created` → Airflow asset event (the push path of the trigger, SPEC §8).

    SARMERGE_WEBHOOK_SECRET=... AIRFLOW_API_URL=http://127.0.0.1:8080 AIRFLOW_API_USER=... AIRFLOW_API_PASSWORD=... \\
        python -m tasks.relay serve --port 8790
    python -m tasks.relay install-webhook --url http://127.0.0.1:8790/webhook    # registers it in MLflow

Each delivery is checked before anything is forwarded: the `X-MLflow-Signature` HMAC-SHA256 over
"{delivery id}.{timestamp}.{body}" with the shared secret (constant-time compare), a timestamp no further than
`trigger.relay.max_age_s` from now (replays and stale deliveries are refused), a delivery id not seen before, and a
model name that belongs to a family in params.yaml. Accepted events are POSTed to Airflow's `/api/v2/assets/events`
for the family's asset, with {name, version} in the event's extra. Secrets come from the environment only and are
never logged.

The relay faces unauthenticated callers, so every resource a request can hold is bounded before the signature is
checked (SPEC §11): the body (a POST must declare a `Content-Length` of at most `trigger.relay.max_body_bytes`; a
missing, malformed or oversized length and chunked bodies are refused before a byte of body is read), the time
(`read_timeout_s` per socket read and as a deadline for the whole request: slow clients are cut off), and the
concurrency (`max_connections` handled at once, a `backlog` listen queue; beyond that a 503 with `Retry-After`,
which MLflow's delivery retries). Header values are validated before use and escaped before they are logged; the
JSON payload is parsed only after the signature holds and only up to a nesting depth of 32.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import OrderedDict
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from sarmerge.errors import SarmergeError, run_cli
from tasks.params import Params, load_params
from tasks.registry import is_valid_name

log = logging.getLogger("sarmerge.relay")
SIGNATURE_HEADER = "X-MLflow-Signature"
TIMESTAMP_HEADER = "X-MLflow-Timestamp"
DELIVERY_HEADER = "X-MLflow-Delivery-Id"
MAX_JSON_DEPTH = 32
MAX_SIGNATURES = 8  # several signatures in one header: secret rotation; more is a forgery attempt
_DELIVERY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_SIGNATURE_RE = re.compile(r"v1,[A-Za-z0-9+/]{43}=")
_VERSION_RE = re.compile(r"[1-9][0-9]{0,9}")
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_JSON_BRACKETS = re.compile(rb"[\[\]{}]")


class Rejected(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


def printable(value: object, limit: int = 64) -> str:
    """A caller-controlled value made safe for one log line: escapes (no newlines, no terminal controls), cut."""
    text = str(value)
    escaped = text[:limit].encode("unicode_escape", "backslashreplace").decode("ascii")
    return escaped + ("…" if len(text) > limit else "")


def json_depth(body: bytes) -> int:
    """Deepest nesting of arrays/objects in a JSON text (strings skipped), without recursion."""
    depth = deepest = 0
    for m in _JSON_BRACKETS.finditer(_JSON_STRING.sub(b'""', body)):
        depth += 1 if m.group() in (b"[", b"{") else -1
        deepest = max(deepest, depth)
    return deepest


def parse_payload(body: bytes) -> dict[str, Any]:
    """The signed JSON payload, refused (400) when it is not JSON, nested too deeply, or not an object."""
    if json_depth(body) > MAX_JSON_DEPTH:
        raise Rejected(400, f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        event = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise Rejected(400, f"not JSON: {printable(e, 120)}") from None
    if not isinstance(event, dict):
        raise Rejected(400, "not a model_version payload")
    return event


def sign(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """The signature MLflow sends: v1,<base64 HMAC-SHA256(secret, "{delivery_id}.{timestamp}.{body}")>."""
    digest = hmac.new(secret.encode(), f"{delivery_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify(headers: Any, body: bytes, secret: str, *, max_age_s: float, now: float | None = None) -> str:
    """Check signature and freshness; returns the delivery id, raises Rejected(401) otherwise."""
    signature, timestamp, delivery = (headers.get(h) for h in (SIGNATURE_HEADER, TIMESTAMP_HEADER, DELIVERY_HEADER))
    if not signature or not timestamp or not delivery:
        raise Rejected(401, "unsigned request: missing signature, timestamp or delivery id header")
    # fullmatch over ASCII classes: a trailing newline, a folded header or a Unicode digit never passes
    if not _DELIVERY_RE.fullmatch(delivery):
        raise Rejected(401, "malformed delivery id")
    if not re.fullmatch(r"[0-9]{1,12}", timestamp):
        raise Rejected(401, "malformed timestamp")
    age = (time.time() if now is None else now) - int(timestamp)
    if abs(age) > max_age_s:
        raise Rejected(401, f"stale delivery: timestamp {age:+.0f}s from now (limit {max_age_s:.0f}s)")
    # the header may carry several space-separated signatures (secret rotation)
    offered = signature.split()
    if not offered or len(offered) > MAX_SIGNATURES or not all(_SIGNATURE_RE.fullmatch(s) for s in offered):
        raise Rejected(401, "malformed signature")
    expected = sign(secret, delivery, timestamp, body).encode()
    if not any(hmac.compare_digest(expected, s.encode()) for s in offered):
        raise Rejected(401, "bad signature")
    return delivery


class AirflowClient:
    """Posts asset events to Airflow's REST API; token from AIRFLOW_API_TOKEN or user/password via /auth/token."""

    def __init__(self, base_url: str, *, token: str | None = None, user: str | None = None,
                 password: str | None = None, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._static_token, self._user, self._password = token, user, password
        self._token: str | None = token
        self._asset_ids: dict[str, int] = {}
        self.timeout = timeout
        self._lock = threading.Lock()
        self._post_lock = threading.Lock()

    @classmethod
    def from_env(cls) -> AirflowClient:
        env = os.environ.get
        return cls(env("AIRFLOW_API_URL", "http://127.0.0.1:8080"), token=env("AIRFLOW_API_TOKEN"),
                   user=env("AIRFLOW_API_USER"), password=env("AIRFLOW_API_PASSWORD"))

    def _login(self) -> str:
        if self._static_token:
            return self._static_token
        if not self._user or not self._password:
            raise SarmergeError("Airflow credentials missing: set AIRFLOW_API_TOKEN, or AIRFLOW_API_USER and "
                                "AIRFLOW_API_PASSWORD")
        body = json.dumps({"username": self._user, "password": self._password}).encode()
        req = urllib.request.Request(f"{self.base_url}/auth/token", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            return json.loads(resp.read())["access_token"]

    def request(self, method: str, path: str, payload: Any = None, timeout: float | None = None,
                retry: bool | None = None) -> Any:
        """One API call; logs in again once on 401, and retries on 5xx and timeouts (SQLite-backed Airflow under load)
        when the call is safe to repeat: reads, or `retry=True` for writes whose repetition is harmless."""
        retry = method == "GET" if retry is None else retry
        relogged, attempt = False, 0
        while True:
            attempt += 1
            with self._lock:
                if self._token is None:
                    self._token = self._login()
                token = self._token
            data = None if payload is None else json.dumps(payload).encode()
            req = urllib.request.Request(f"{self.base_url}{path}", data=data, method=method,
                                         headers={"Content-Type": "application/json",
                                                  "Authorization": f"Bearer {token}"})
            try:
                with urllib.request.urlopen(req, timeout=timeout or self.timeout) as resp:
                    return json.loads(resp.read() or b"null")
            except urllib.error.HTTPError as e:
                if e.code == 401 and not relogged and not self._static_token:
                    relogged = True
                    with self._lock:
                        self._token = None  # expired: log in again once
                    continue
                if e.code >= 500 and retry and attempt < 4:
                    time.sleep(attempt)
                    continue
                raise SarmergeError(f"Airflow API {method} {path}: HTTP {e.code} {e.read()[:300]!r}") from e
            except (TimeoutError, urllib.error.URLError) as e:
                if retry and attempt < 4:
                    time.sleep(attempt)
                    continue
                raise SarmergeError(f"Airflow API {method} {path}: {e}") from e

    def asset_id(self, name: str) -> int:
        if name not in self._asset_ids:
            query = urllib.parse.urlencode({"name_pattern": name, "limit": 100})
            found = [a for a in self.request("GET", f"/api/v2/assets?{query}")["assets"] if a["name"] == name]
            if not found:
                raise SarmergeError(f"Airflow has no asset named {name!r} (is the merge_on_upload DAG parsed?)")
            self._asset_ids[name] = int(found[0]["id"])
        return self._asset_ids[name]

    def post_event(self, asset_name: str, extra: dict[str, Any]) -> Any:
        """One event at a time (concurrent POSTs deadlock SQLite-backed Airflow, see sarmerge_airflow/sqlite.py);
        retried, since a repeated event is harmless: the ledger processes each version once."""
        with self._post_lock:
            return self.request("POST", "/api/v2/assets/events",
                                {"asset_id": self.asset_id(asset_name), "extra": extra}, retry=True)


class Relay:
    def __init__(self, params: Params, secret: str, forward: Callable[[str, dict[str, Any]], Any],
                 *, models: str | None = None) -> None:
        if not secret:
            raise SarmergeError("SARMERGE_WEBHOOK_SECRET is empty: the relay refuses to run without a secret")
        self.params, self.secret, self.forward = params, secret, forward
        self.models = re.compile(models) if models else None
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = {"accepted": 0, "rejected": 0, "ignored": 0, "duplicate": 0, "busy": 0, "cut_off": 0}

    def count(self, outcome: str) -> None:
        with self._lock:
            self.stats[outcome] += 1

    def _remember(self, delivery: str) -> bool:
        """False if this delivery id was already accepted within the freshness window (a replay or a retry)."""
        now, window = time.time(), 2 * self.params.trigger.relay.max_age_s
        with self._lock:
            while self._seen and next(iter(self._seen.values())) < now - window:
                self._seen.popitem(last=False)
            if delivery in self._seen:
                return False
            self._seen[delivery] = now
            return True

    def handle(self, headers: Any, body: bytes) -> tuple[int, dict[str, Any]]:
        try:
            delivery = verify(headers, body, self.secret, max_age_s=self.params.trigger.relay.max_age_s)
            event = parse_payload(body)
            data = event.get("data")
            if not isinstance(data, dict) or not isinstance(data.get("name"), str) or \
                    not isinstance(data.get("version"), str | int) or isinstance(data.get("version"), bool):
                raise Rejected(400, "not a model_version payload")
            name, version = data["name"], str(data["version"])
            if not _VERSION_RE.fullmatch(version):
                raise Rejected(400, f"model version {printable(version)!r} is not a number")
        except Rejected as e:
            self.count("rejected")
            log.warning("rejected delivery %s: %s", printable(headers.get(DELIVERY_HEADER)), e.reason)
            return e.status, {"status": "rejected", "reason": e.reason}
        if (event.get("entity"), event.get("action")) != ("model_version", "created"):
            self.count("ignored")
            return 200, {"status": "ignored", "reason": f"event {printable(event.get('entity'))}."
                                                        f"{printable(event.get('action'))}"}
        family = self.params.family_of(name) if is_valid_name(name) else None
        if family is None or (self.models is not None and not self.models.fullmatch(name)):
            self.count("ignored")
            log.info("ignored %s/%s: not a watched model name", printable(name), version)
            return 200, {"status": "ignored", "reason": f"model {printable(name)!r} is not watched"}
        tags = data.get("tags")
        kind = tags.get("sarmerge.kind") if isinstance(tags, dict) else None
        if kind is not None and kind != "rlvr":
            self.count("ignored")
            return 200, {"status": "ignored", "reason": f"sarmerge.kind={printable(kind)!r} does not start merges"}
        if not self._remember(delivery):
            self.count("duplicate")
            return 200, {"status": "duplicate", "delivery": delivery}
        extra = {"name": name, "version": version, "source": "webhook", "delivery_id": delivery,
                 "relayed_at": time.time()}
        try:
            self.forward(family.asset_name, extra)
        except Exception as e:
            with self._lock:
                self._seen.pop(delivery, None)  # let MLflow's retry through
            log.error("forwarding %s/%s to Airflow failed: %s", name, version, e)
            return 502, {"status": "error", "reason": "could not reach Airflow"}
        self.count("accepted")
        log.info("relayed %s/%s → asset %s", name, version, family.asset_name)
        return 200, {"status": "accepted", "asset": family.asset_name, "name": name, "version": version}


class RelayServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer with bounded concurrency and per-request read deadlines.

    At most `max_connections` requests are handled at once; a connection beyond that is answered 503 with
    `Retry-After` at once, without reading it. A reaper thread shuts down any connection that has not delivered its
    headers and body within `read_timeout_s` (a per-read socket timeout alone lets a client that sends one byte
    every few seconds hold a worker for ever)."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], *, max_connections: int,
                 read_timeout_s: float, backlog: int) -> None:
        self.request_queue_size = backlog  # read by server_activate() (listen)
        self.read_timeout_s = read_timeout_s
        self._slots = threading.BoundedSemaphore(max_connections)
        self._reading: dict[socket.socket, float] = {}  # connection → read deadline (monotonic)
        self._reading_lock = threading.Lock()
        self._closed = threading.Event()
        self.on_busy: Callable[[], None] = lambda: None
        self.on_cut_off: Callable[[], None] = lambda: None
        super().__init__(address, handler)
        threading.Thread(target=self._reap, name="relay-reaper", daemon=True).start()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.on_busy()
            with contextlib.suppress(OSError):
                request.settimeout(1.0)
                body = b'{"status": "busy", "reason": "too many connections; retry"}'
                request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nRetry-After: 1\r\nConnection: close\r\n"
                                b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode() +
                                b"\r\n\r\n" + body)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.reading_done(request)
            self._slots.release()

    def shutdown_request(self, request: Any) -> None:
        # drop what already arrived (bounded, never waiting): closing with unread bytes sends a reset, which can
        # destroy the answer (a 503 or 413) before the client has read it
        with contextlib.suppress(OSError):
            request.setblocking(False)
            for _ in range(16):
                if not request.recv(65536):
                    break
        super().shutdown_request(request)

    def reading_started(self, conn: socket.socket) -> None:
        with self._reading_lock:
            self._reading[conn] = time.monotonic() + self.read_timeout_s

    def reading_done(self, conn: socket.socket) -> None:
        with self._reading_lock:
            self._reading.pop(conn, None)

    def _reap(self) -> None:
        while not self._closed.wait(min(0.5, self.read_timeout_s / 4)):
            now = time.monotonic()
            with self._reading_lock:
                late = [c for c, deadline in self._reading.items() if deadline < now]
                for c in late:
                    del self._reading[c]
            for c in late:
                self.on_cut_off()
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_RDWR)  # the handler's blocked read returns; it then gives up

    def server_close(self) -> None:
        self._closed.set()
        super().server_close()


def make_server(relay: Relay, host: str, port: int, path: str = "/webhook") -> RelayServer:
    limits = relay.params.trigger.relay

    class Handler(BaseHTTPRequestHandler):
        timeout = limits.read_timeout_s  # per socket operation (StreamRequestHandler.setup applies it)

        def setup(self) -> None:
            super().setup()
            server.reading_started(self.connection)

        def _send(self, status: int, payload: dict[str, Any], *, close: bool = False) -> None:
            server.reading_done(self.connection)
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if close:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            with contextlib.suppress(OSError):
                self.wfile.write(body)

        def _refuse(self, status: int, reason: str) -> None:
            """Answer without reading the body (the connection is closed: its unread bytes are dropped)."""
            relay.count("rejected")
            log.warning("refused a request from %s: %s", self.client_address[0], reason)
            self._send(status, {"status": "rejected", "reason": reason}, close=True)

        def do_GET(self) -> None:
            if self.path == "/health":
                with relay._lock:
                    stats = dict(relay.stats)
                self._send(200, {"status": "ok", **stats})
            else:
                self._send(404, {"status": "not found"})

        def do_POST(self) -> None:
            if self.path != path:
                self._send(404, {"status": "not found"}, close=True)
                return
            if self.headers.get("Transfer-Encoding") is not None:
                self._refuse(411, "chunked or encoded bodies are not accepted: send a Content-Length")
                return
            declared = self.headers.get_all("Content-Length") or []
            if len(declared) != 1:
                self._refuse(411, "exactly one Content-Length header is required")
                return
            if not re.fullmatch(r"[0-9]{1,12}", declared[0].strip()):
                self._refuse(400, f"malformed Content-Length {printable(declared[0], 24)!r}")
                return
            length = int(declared[0])
            if length > limits.max_body_bytes:
                self._refuse(413, f"body too large ({length} bytes; limit {limits.max_body_bytes})")
                return
            try:
                body = self.rfile.read(length)
            except OSError:  # the read deadline or the socket timeout cut the client off
                body = b""
            if len(body) != length:
                relay.count("cut_off")
                self.close_connection = True
                return
            server.reading_done(self.connection)
            self._send(*relay.handle(self.headers, body))

        def handle_one_request(self) -> None:
            try:
                super().handle_one_request()
            except OSError:  # timed out or shut down by the reaper while reading the request line or headers
                self.close_connection = True

        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug("%s %s", self.address_string(), printable(fmt % args, 200))

    server = RelayServer((host, port), Handler, max_connections=limits.max_connections,
                         read_timeout_s=limits.read_timeout_s, backlog=limits.backlog)
    server.on_busy = lambda: relay.count("busy")
    server.on_cut_off = lambda: relay.count("cut_off")
    return server


def install_webhook(url: str, secret: str, name: str = "sarmerge-relay") -> str:
    """Create (or update) the MLflow webhook that sends model_version.created to the relay."""
    from tasks.registry import get_client

    client = get_client()
    for hook in client.list_webhooks():
        if hook.name == name:
            client.update_webhook(hook.webhook_id, url=url, secret=secret, events=["model_version.created"],
                                  status="ACTIVE")
            return hook.webhook_id
    return client.create_webhook(name=name, url=url, events=["model_version.created"], secret=secret).webhook_id


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tasks.relay", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the relay")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8790)
    s.add_argument("--path", default="/webhook")
    s.add_argument("--models", default=os.environ.get("SARMERGE_RELAY_MODELS"),
                   help="extra regex a model name must fully match (default: any name in a params.yaml family)")
    w = sub.add_parser("install-webhook", help="register the relay as an MLflow webhook")
    w.add_argument("--url", required=True)
    w.add_argument("--name", default="sarmerge-relay")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    secret = os.environ.get("SARMERGE_WEBHOOK_SECRET", "")

    def body() -> int:
        if args.command == "install-webhook":
            if not secret:
                raise SarmergeError("set SARMERGE_WEBHOOK_SECRET (the secret MLflow signs deliveries with)")
            print(install_webhook(args.url, secret, args.name))
            return 0
        airflow = AirflowClient.from_env()
        relay = Relay(load_params(), secret, airflow.post_event, models=args.models)
        server = make_server(relay, args.host, args.port, args.path)
        log.info("relay listening on http://%s:%d%s → %s", args.host, server.server_port, args.path, airflow.base_url)
        server.serve_forever()
        return 0

    return run_cli("tasks.relay", body)


if __name__ == "__main__":
    sys.exit(main())
