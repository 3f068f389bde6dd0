"""``corral serve`` as a service among others: the bearer token from its flag, variable
or config file, request ids through real uvicorn into the log, log lines that say which
tenant and call they are about, and a warning when it listens beyond loopback with no
token."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from corral.cli._serve import _Formatter, _is_loopback
from tests.helpers import SERVE_FAST, Served

pytestmark = pytest.mark.timeout(60)

TOKEN = "serve-Token-0123456789abcdef"


def test_token_request_ids_and_log_lines(tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    served = Served(*SERVE_FAST, "--auth-token", TOKEN, "--log-level", "debug", log=log)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        with httpx.Client(base_url=served.url, timeout=30) as client:
            refused = client.post("/v1/tenants/alice/call/whoami")
            health = client.get("/healthz", headers={"X-Request-ID": "probe-1"})
            ok = client.post(
                "/v1/tenants/alice/call/whoami", headers={**auth, "X-Request-ID": "call-1"}
            )
            crashed = client.post(
                "/v1/tenants/bob/call/crash",
                json={"args": [3]},
                headers={**auth, "X-Request-ID": "call-2"},
            )
            bad = client.post("/v1/tenants/a%0AINFO:corral:forged/call/whoami", headers=auth)
            missing = client.get("/nope", headers=auth)
    finally:
        assert served.stop() == 0, log.read_text()
    assert refused.status_code == 401 and refused.json()["error"]["type"] == "Unauthorized"
    assert refused.headers["www-authenticate"] == 'Bearer realm="corral"'
    assert health.status_code == 200 and health.headers["x-request-id"] == "probe-1"
    assert ok.status_code == 200 and ok.headers["x-request-id"] == "call-1"
    assert crashed.status_code == 502 and crashed.headers["x-request-id"] == "call-2"
    assert bad.status_code == 400 and bad.json()["error"]["kind"] == "tenant"
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "NotFound"
    assert re.fullmatch(r"[0-9a-f]{32}", bad.headers["x-request-id"])

    text = log.read_text()
    assert TOKEN not in text
    lines = text.splitlines()
    # The worker that call-1 started logs its start with call-1's id.
    assert any(
        "worker ready" in line and "tenant=alice" in line and "request_id=call-1" in line
        for line in lines
    ), text
    (failed,) = [line for line in lines if "POST /v1/tenants/bob/call/crash 502" in line]
    assert " WARNING corral.server: " in failed, failed
    for field in ("request_id=call-2", "tenant=bob", "error=WorkerCrashedError", "exitcode=3"):
        assert failed.count(field) == 1, (field, failed)  # in the message, not repeated
    # No line a client or a kernel could forge: each starts with a timestamp.
    stamp = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ [\w.]+: ")
    for line in lines:
        assert stamp.match(line), line
        assert line.isprintable() and len(line) < 1000, line


@pytest.mark.parametrize(
    ("args", "env", "source"),
    [(("--auth-token", "XYZZY has space"), {"CORRAL_AUTH_TOKEN": TOKEN}, "--auth-token"),
     ((), {"CORRAL_AUTH_TOKEN": "tab\tQUUX"}, "CORRAL_AUTH_TOKEN")],
)  # fmt: skip
def test_a_bad_token_is_refused_without_showing_it(
    args: tuple[str, ...], env: dict[str, str], source: str
) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "corral", "serve", "--port", "0", *args],
        capture_output=True, text=True, timeout=30, env={**os.environ, **env},
    )  # fmt: skip
    assert out.returncode == 2, out
    assert out.stderr.startswith(f"corral serve: error: {source}: the auth token"), out.stderr
    assert "XYZZY" not in out.stderr and "QUUX" not in out.stderr


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("[::1]", True),
     ("localhost", True), ("0.0.0.0", False), ("::", False), ("10.0.0.5", False),
     ("example.com", False)],
)  # fmt: skip
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert _is_loopback(host) is loopback


def test_the_text_format_does_not_repeat_what_the_message_says() -> None:
    record = logging.makeLogRecord(
        {"name": "corral", "levelname": "INFO", "levelno": 20, "msg": "worker ready tenant=a",
         "tenant": "a", "pid": 12, "request_id": "r"}
    )  # fmt: skip
    line = _Formatter(as_json=False).format(record)
    assert line.endswith(" INFO corral: worker ready tenant=a pid=12 request_id=r"), line
