"""The webhook relay: signature, freshness, replay and model-name checks over real HTTP, and MLflow's own webhook
deliveries (signed by a real MLflow server) passing through it."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
import uuid

import pytest
from pipeline_support import env_vars, write_params

pytestmark = pytest.mark.pipeline
SECRET = "relay-test-secret"


@pytest.fixture
def relay(tmp_path):
    from tasks.params import load_params
    from tasks.relay import Relay, make_server

    params = load_params(write_params(tmp_path / "params.yaml", root=tmp_path / "root", family="relay"))
    forwarded: list[tuple[str, dict]] = []
    relay = Relay(params, SECRET, lambda asset, extra: forwarded.append((asset, extra)))
    server = make_server(relay, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/webhook", forwarded, relay
    server.shutdown()
    server.server_close()


def delivery(name: str = "relay-math", version: str = "3", *, secret: str = SECRET, age: float = 0.0,
             entity: str = "model_version", action: str = "created") -> tuple[bytes, dict[str, str]]:
    from tasks.relay import sign

    body = json.dumps({"entity": entity, "action": action, "timestamp": "2026-01-01T00:00:00+00:00",
                       "data": {"name": name, "version": version, "source": "runs:/x/checkpoint", "run_id": "x",
                                "tags": {"sarmerge.kind": "rlvr"}, "description": None}}).encode()
    delivery_id, ts = str(uuid.uuid4()), str(int(time.time() - age))
    return body, {"X-MLflow-Delivery-Id": delivery_id, "X-MLflow-Timestamp": ts,
                  "X-MLflow-Signature": sign(secret, delivery_id, ts, body), "Content-Type": "application/json"}


def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_valid_signature_is_forwarded_to_the_family_asset(relay):
    url, forwarded, _ = relay
    status, answer = post(url, *delivery("relay-code", "7"))
    assert (status, answer["status"]) == (200, "accepted")
    assert len(forwarded) == 1
    asset, extra = forwarded[0]
    assert asset == "sarmerge_family_relay"
    assert (extra["name"], extra["version"], extra["source"]) == ("relay-code", "7", "webhook")


def test_forged_signatures_are_rejected(relay):
    url, forwarded, relay_obj = relay
    body, headers = delivery(secret="not-the-secret")
    assert post(url, body, headers)[0] == 401
    body, headers = delivery()
    tampered = body.replace(b'"version": "3"', b'"version": "4"')
    assert post(url, tampered, headers) == (401, {"status": "rejected", "reason": "bad signature"})
    body, headers = delivery()
    headers["X-MLflow-Delivery-Id"] = str(uuid.uuid4())  # the id is part of the signed content
    assert post(url, body, headers)[0] == 401
    body, headers = delivery()
    del headers["X-MLflow-Signature"]
    status, answer = post(url, body, headers)
    assert status == 401 and "unsigned" in answer["reason"]
    assert forwarded == [] and relay_obj.stats["rejected"] == 4


def test_stale_and_future_deliveries_are_rejected(relay):
    url, forwarded, _ = relay
    for age in (3600, -3600):  # max_age_s is 300 in params.yaml
        status, answer = post(url, *delivery(age=age))
        assert status == 401 and "stale" in answer["reason"]
    assert post(url, *delivery(age=120))[0] == 200  # within the window
    assert len(forwarded) == 1


def test_wrong_model_name_and_other_events_are_not_forwarded(relay):
    url, forwarded, _ = relay
    for body, headers in (delivery("someone-elses-model"), delivery("relay-merged"),
                          delivery(action="updated")):
        status, answer = post(url, body, headers)
        assert (status, answer["status"]) == (200, "ignored")
    assert forwarded == []


def test_a_replayed_delivery_is_forwarded_once(relay):
    url, forwarded, _ = relay
    body, headers = delivery()
    assert post(url, body, headers)[1]["status"] == "accepted"
    assert post(url, body, headers)[1]["status"] == "duplicate"
    assert len(forwarded) == 1


def test_relay_refuses_to_start_without_a_secret(tmp_path):
    from sarmerge.errors import SarmergeError
    from tasks.params import load_params
    from tasks.relay import Relay

    params = load_params(write_params(tmp_path / "params.yaml", root=tmp_path / "root", family="relay"))
    with pytest.raises(SarmergeError, match="SARMERGE_WEBHOOK_SECRET"):
        Relay(params, "", lambda *a: None)


def test_mlflow_webhook_deliveries_pass_through(relay, mlflow_server):
    """MLflow's server signs `model_version.created` itself; the relay verifies that and forwards watched names only."""
    url, forwarded, _ = relay
    with env_vars(MLFLOW_TRACKING_URI=mlflow_server.url):
        from tasks.registry import get_client
        from tasks.relay import install_webhook

        hook = install_webhook(url, SECRET, name=f"relay-test-{uuid.uuid4().hex[:6]}")
        client = get_client()
        exp = client.create_experiment(f"relay-{uuid.uuid4().hex[:6]}")
        run = client.create_run(exp)
        for name in ("relay-math", "unwatched-model"):
            client.create_registered_model(name)
            client.create_model_version(name, f"runs:/{run.info.run_id}/checkpoint", run_id=run.info.run_id,
                                        tags={"sarmerge.kind": "rlvr"})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not forwarded:
            time.sleep(0.2)
        time.sleep(1.0)  # the unwatched delivery, if it were forwarded, would land by now
        client.delete_webhook(hook)
    assert [(extra["name"], extra["version"]) for _, extra in forwarded] == [("relay-math", "1")]
