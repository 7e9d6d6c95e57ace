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
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import logging
import os
import re
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

from sarmerge.errors import SarmergeError
from tasks.params import Params, load_params

log = logging.getLogger("sarmerge.relay")
SIGNATURE_HEADER = "X-MLflow-Signature"
TIMESTAMP_HEADER = "X-MLflow-Timestamp"
DELIVERY_HEADER = "X-MLflow-Delivery-Id"
MAX_BODY = 1 << 20


class Rejected(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


def sign(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """The signature MLflow sends: v1,<base64 HMAC-SHA256(secret, "{delivery_id}.{timestamp}.{body}")>."""
    digest = hmac.new(secret.encode(), f"{delivery_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify(headers: Any, body: bytes, secret: str, *, max_age_s: float, now: float | None = None) -> str:
    """Check signature and freshness; returns the delivery id, raises Rejected(401) otherwise."""
    signature, timestamp, delivery = (headers.get(h) for h in (SIGNATURE_HEADER, TIMESTAMP_HEADER, DELIVERY_HEADER))
    if not signature or not timestamp or not delivery:
        raise Rejected(401, "unsigned request: missing signature, timestamp or delivery id header")
    if not re.fullmatch(r"\d{1,12}", timestamp):
        raise Rejected(401, "malformed timestamp")
    age = (time.time() if now is None else now) - int(timestamp)
    if abs(age) > max_age_s:
        raise Rejected(401, f"stale delivery: timestamp {age:+.0f}s from now (limit {max_age_s:.0f}s)")
    expected = sign(secret, delivery, timestamp, body)
    # the header may carry several space-separated signatures (secret rotation)
    if not any(hmac.compare_digest(expected, s.strip()) for s in signature.split()):
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
        self.stats = {"accepted": 0, "rejected": 0, "ignored": 0, "duplicate": 0}

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
        except Rejected as e:
            self.stats["rejected"] += 1
            log.warning("rejected delivery %s: %s", str(headers.get(DELIVERY_HEADER))[:64], e.reason)
            return e.status, {"status": "rejected", "reason": e.reason}
        try:
            event = json.loads(body)
            data = event["data"]
            name, version = str(data["name"]), str(data["version"])
        except (json.JSONDecodeError, KeyError, TypeError):
            self.stats["rejected"] += 1
            return 400, {"status": "rejected", "reason": "not a model_version payload"}
        if (event.get("entity"), event.get("action")) != ("model_version", "created"):
            self.stats["ignored"] += 1
            return 200, {"status": "ignored", "reason": f"event {event.get('entity')}.{event.get('action')}"}
        family = self.params.family_of(name)
        if family is None or (self.models is not None and not self.models.fullmatch(name)):
            self.stats["ignored"] += 1
            log.info("ignored %s/%s: not a watched model name", name, version)
            return 200, {"status": "ignored", "reason": f"model {name!r} is not watched"}
        kind = (data.get("tags") or {}).get("sarmerge.kind")
        if kind is not None and kind != "rlvr":
            self.stats["ignored"] += 1
            return 200, {"status": "ignored", "reason": f"sarmerge.kind={kind!r} does not start merges"}
        if not self._remember(delivery):
            self.stats["duplicate"] += 1
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
        self.stats["accepted"] += 1
        log.info("relayed %s/%s → asset %s", name, version, family.asset_name)
        return 200, {"status": "accepted", "asset": family.asset_name, "name": name, "version": version}


def make_server(relay: Relay, host: str, port: int, path: str = "/webhook") -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, payload: dict[str, Any]) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path == "/health":
                self._send(200, {"status": "ok", **relay.stats})
            else:
                self._send(404, {"status": "not found"})

        def do_POST(self) -> None:
            if self.path != path:
                self._send(404, {"status": "not found"})
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                self._send(413, {"status": "rejected", "reason": "body too large"})
                return
            self._send(*relay.handle(self.headers, self.rfile.read(length)))

        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug("%s " + fmt, self.address_string(), *args)

    return ThreadingHTTPServer((host, port), Handler)


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
    try:
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
    except SarmergeError as e:
        print(f"tasks.relay: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
