"""The gateway's dashboard (``GET /``) in a real browser: headless Chromium loads it from
a real ``corral serve`` process, runs its script (which polls ``/v1/workers`` and
``/v1/events``), and the rendered DOM is checked: once as Chromium dumps it, and once
live over the DevTools protocol (layout, computed styles, a screenshot) with the
longest tenant key the rule allows (128 characters) and a worker with a call in flight.

Needs Debian's ``chromium`` package. Without it the test is skipped, unless ``CI`` is
set: then it fails, so that CI cannot silently stop running it."""

from __future__ import annotations

import base64
import concurrent.futures
import datetime
import json
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from corral import LayerStatus
from corral.server._dashboard import DASHBOARD_HTML
from tests.helpers import SERVE_FAST, Served, wait_pids_exit

pytestmark = pytest.mark.timeout(120)

CHROMIUM_TIMEOUT = 60.0
# Chosen by the client, shown by the page: every punctuation mark the tenant-key rule
# allows. A key with markup in it is refused (400) before it could reach the page.
ODD_TENANT = "gamma.x_y-z:w@example.com+1"
MARKUP_TENANT = "gamma&<injected>"


def find_chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        message = "chromium is not installed (Debian: apt-get install -y chromium)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI is set, so the dashboard test must run")
        pytest.skip(message)
    return path


def group_members(pgid: int) -> list[int]:
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid:
                members.append(proc.pid)
        except ProcessLookupError:
            pass
    return members


def stop_group(browser: subprocess.Popen[bytes]) -> None:
    """SIGKILL whatever is left of ``browser``'s process group; return once all are gone."""
    members = group_members(browser.pid)
    if members:
        os.killpg(browser.pid, signal.SIGKILL)
    browser.wait()
    left = wait_pids_exit(members, timeout=10)
    assert not left, f"chromium processes outlived the kill: {left}"


def dump_dom(chromium: str, url: str) -> str:
    """``url``'s DOM once its scripts have run (5 s of virtual time), from headless
    Chromium in a process group of its own, with a throwaway profile. Every process of
    the group is gone when this returns."""
    with tempfile.TemporaryDirectory(prefix="corral-dashboard-") as scratch:
        dom, log = Path(scratch, "dom.html"), Path(scratch, "chromium.log")
        # Files, not pipes: a helper that outlived the browser would hold a pipe open.
        with dom.open("wb") as out, log.open("wb") as err:
            browser = subprocess.Popen(
                [
                    chromium,
                    "--headless",
                    "--no-sandbox",  # we run as root
                    "--disable-gpu",
                    "--virtual-time-budget=5000",
                    f"--user-data-dir={Path(scratch, 'profile')}",
                    "--dump-dom",
                    url,
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,  # its own process group: helpers included
            )
        timed_out = False
        try:
            browser.wait(CHROMIUM_TIMEOUT)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            stop_group(browser)
        assert not timed_out, f"chromium took over {CHROMIUM_TIMEOUT}s:\n{log.read_text()}"
        assert browser.returncode == 0, log.read_text()[-3000:]
        return dom.read_text()


@dataclass
class WorkerRow:
    """A ``tr.worker``."""

    tenant: str | None
    state: str | None  # data-state
    cells: list[str] = field(default_factory=list)
    state_text: str = ""  # the text of its span.state


@dataclass
class StopItem:
    """An ``li.stop``."""

    tenant: str | None
    text: str = ""
    reason: str = ""  # the text of its span.reason


class DashboardParser(HTMLParser):
    """The parts of the rendered dashboard that the test checks."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.body: dict[str, str | None] = {}
        self.rows: list[WorkerRow] = []
        self.stops: list[StopItem] = []
        self.tags: list[str] = []  # every start tag, to catch markup injected by data
        self._row: WorkerRow | None = None
        self._stop: StopItem | None = None
        self._span: str | None = None  # "state" or "reason" while inside such a span

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        classes = (attributes.get("class") or "").split()
        self.tags.append(tag)
        if tag == "body":
            self.body = attributes
        elif tag == "tr" and "worker" in classes:
            self._row = WorkerRow(attributes.get("data-tenant"), attributes.get("data-state"))
            self.rows.append(self._row)
        elif tag == "td" and self._row is not None:
            self._row.cells.append("")
        elif tag == "li" and "stop" in classes:
            self._stop = StopItem(attributes.get("data-tenant"))
            self.stops.append(self._stop)
        elif tag == "span" and ("state" in classes or "reason" in classes):
            self._span = "state" if "state" in classes else "reason"

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr":
            self._row = None
        elif tag == "li":
            self._stop = None
        elif tag == "span":
            self._span = None

    def handle_data(self, data: str) -> None:
        if self._row is not None and self._row.cells:
            self._row.cells[-1] += data
            if self._span == "state":
                self._row.state_text += data
        if self._stop is not None:
            self._stop.text += data
            if self._span == "reason":
                self._stop.reason += data


def test_dashboard_shows_live_workers_and_recent_stops(tmp_path: Path) -> None:
    chromium = find_chromium()
    served = Served(*SERVE_FAST, log=tmp_path / "serve.log")
    try:
        pids: dict[str, int] = {}
        with httpx.Client(timeout=30) as client:
            for tenant in ("alpha", "beta", ODD_TENANT):
                answer = client.post(f"{served.url}/v1/tenants/{tenant}/call/whoami", json={})
                assert answer.status_code == 200, answer.text
                pids[tenant] = answer.json()["result"]["pid"]
            evicted = client.delete(f"{served.url}/v1/tenants/beta")
            assert evicted.json() == {"tenant": "beta", "evicted": True}
            refused = client.post(f"{served.url}/v1/tenants/{MARKUP_TENANT}/call/whoami")
            assert refused.status_code == 400, refused.text
        html = dump_dom(chromium, f"{served.url}/")
        tree = [p.pid for p in psutil.Process(served.proc.pid).children(recursive=True)]
    finally:
        code = served.stop()
    assert code == 0, (tmp_path / "serve.log").read_text()
    # The gateway's warden and workers would be orphans now, out of conftest's sight.
    assert wait_pids_exit(tree, timeout=30) == []  # a hang guard

    page = DashboardParser()
    page.feed(html)
    page.close()
    assert page.body.get("data-loaded") == "1", html  # the script's first refresh worked
    rows = {row.tenant: row for row in page.rows}
    assert set(rows) == {"alpha", ODD_TENANT}, page.rows
    for row in page.rows:
        assert row.state == "ready" and row.state_text == "ready", row
        assert row.tenant is not None and row.cells[:2] == [row.tenant, str(pids[row.tenant])]
    assert "injected" not in page.tags  # no key brought markup
    beta = [stop for stop in page.stops if stop.tenant == "beta"]
    assert len(beta) == 1, page.stops
    assert beta[0].reason == "evicted" and "beta" in beta[0].text, beta
    assert {stop.tenant for stop in page.stops} == {"beta"}, page.stops


def test_with_a_token_the_page_opened_with_it_polls_with_it(tmp_path: Path) -> None:
    """``--auth-token``: the page itself needs none; opened as ``/#token=TOKEN`` its
    polls send the token; opened without, it says how to give it."""
    chromium = find_chromium()
    token = "dashboard-Token-0123456789"
    served = Served(*SERVE_FAST, "--auth-token", token, log=tmp_path / "serve.log")
    try:
        answer = httpx.post(
            f"{served.url}/v1/tenants/alpha/call/whoami",
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        with_token = dump_dom(chromium, f"{served.url}/#token={token}")
        without = dump_dom(chromium, f"{served.url}/")
        tree = [p.pid for p in psutil.Process(served.proc.pid).children(recursive=True)]
    finally:
        code = served.stop()
    assert code == 0, (tmp_path / "serve.log").read_text()
    assert wait_pids_exit(tree, timeout=30) == []  # a hang guard

    page = DashboardParser()
    page.feed(with_token)
    page.close()
    assert page.body.get("data-loaded") == "1", with_token
    assert [row.tenant for row in page.rows] == ["alpha"], page.rows
    assert token not in with_token  # taken off the address bar and never written out

    page = DashboardParser()
    page.feed(without)
    page.close()
    assert page.body.get("data-loaded") == "401" and page.rows == [], without
    assert "open this page as /#token=TOKEN" in without
    log = (tmp_path / "serve.log").read_text()
    assert token not in log


# Runs in the Python started in Chromium's place: its DevTools pipe ends go to fds 3 and 4
# (where --remote-debugging-pipe looks for them), then Chromium is exec'd.
_AT_FDS_3_AND_4 = """
import fcntl, os, sys
ends = [fcntl.fcntl(int(fd), fcntl.F_DUPFD_CLOEXEC, 10) for fd in sys.argv[1:3]]
for fd in sys.argv[1:3]:
    os.close(int(fd))
os.dup2(ends[0], 3)
os.dup2(ends[1], 4)
os.execv(sys.argv[3], sys.argv[3:])
"""


class DevTools:
    """Headless Chromium driven over the DevTools protocol on a pipe
    (``--remote-debugging-pipe``: it reads commands on its fd 3 and writes answers and
    events on its fd 4, each a JSON text ended by a NUL byte), in a process group of its
    own with a throwaway profile, showing one page of ``width`` x ``height`` CSS pixels
    in UTC. :meth:`close` leaves no process of it behind."""

    def __init__(self, chromium: str, profile: Path, log: Path, width: int, height: int) -> None:
        commands_in, self._commands = os.pipe()
        self._answers, answers_out = os.pipe()
        with log.open("wb") as out:
            self.browser = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    _AT_FDS_3_AND_4,
                    str(commands_in),
                    str(answers_out),
                    chromium,
                    "--headless",
                    "--no-sandbox",  # we run as root
                    "--disable-gpu",
                    "--remote-debugging-pipe",
                    f"--user-data-dir={profile}",
                    f"--window-size={width},{height}",
                    "about:blank",
                ],
                pass_fds=(commands_in, answers_out),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,  # its own process group: helpers included
            )
        os.close(commands_in)
        os.close(answers_out)
        self._last_id = 0
        self._pending = b""
        self._events: list[dict[str, Any]] = []
        self._deadline = time.monotonic() + CHROMIUM_TIMEOUT  # for everything it does
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self._session = self.send("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]
        self.send(
            "Emulation.setDeviceMetricsOverride",
            self._session,
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        self.send("Emulation.setTimezoneOverride", self._session, timezoneId="UTC")
        self.send("Page.enable", self._session)

    def _receive(self) -> dict[str, Any]:
        """The next message from Chromium (waiting at most until the deadline)."""
        with selectors.DefaultSelector() as selector:
            selector.register(self._answers, selectors.EVENT_READ)
            while b"\0" not in self._pending:
                left = self._deadline - time.monotonic()
                if left <= 0 or not selector.select(left):
                    raise TimeoutError(f"chromium did not answer within {CHROMIUM_TIMEOUT}s")
                chunk = os.read(self._answers, 1 << 20)
                if not chunk:
                    raise EOFError(f"chromium exited ({self.browser.poll()})")
                self._pending += chunk
        message, self._pending = self._pending.split(b"\0", 1)
        decoded: dict[str, Any] = json.loads(message)
        return decoded

    def send(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        """Run one DevTools command (on the page's ``session``, or the browser's) and
        return its result; events that arrive meanwhile are kept for :meth:`wait_event`."""
        self._last_id += 1
        command: dict[str, Any] = {"id": self._last_id, "method": method, "params": params}
        if session is not None:
            command["sessionId"] = session
        data = json.dumps(command).encode() + b"\0"
        while data:
            data = data[os.write(self._commands, data) :]
        while True:
            message = self._receive()
            if message.get("id") == self._last_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                result: dict[str, Any] = message["result"]
                return result
            self._events.append(message)

    def wait_event(self, method: str) -> dict[str, Any]:
        while True:
            for event in self._events:
                if event.get("method") == method:
                    self._events.remove(event)
                    return event
            self._events.append(self._receive())

    def evaluate(self, expression: str) -> Any:
        """``expression``'s value in the page (awaited if it is a promise), as JSON."""
        answer = self.send(
            "Runtime.evaluate",
            self._session,
            expression=expression,
            awaitPromise=True,
            returnByValue=True,
        )
        if "exceptionDetails" in answer:
            raise AssertionError(f"in the page: {answer['exceptionDetails']}")
        return answer["result"].get("value")

    def load(self, url: str) -> None:
        self.send("Page.navigate", self._session, url=url)
        self.wait_event("Page.loadEventFired")

    def screenshot(self) -> bytes:
        shot = self.send("Page.captureScreenshot", self._session, format="png")
        return base64.b64decode(shot["data"])

    def close(self) -> None:
        try:
            if self.browser.poll() is None:
                self._deadline = time.monotonic() + 10
                self.send("Browser.close")
        except (OSError, TimeoutError, EOFError, RuntimeError):
            pass  # it is killed below either way
        finally:
            os.close(self._commands)
            os.close(self._answers)
            try:
                self.browser.wait(10)
            except subprocess.TimeoutExpired:
                pass
            stop_group(self.browser)


# Resolves once the dashboard's first refresh has been drawn (body[data-loaded]); the
# page's own timer is only a hang guard.
WAIT_LOADED = """new Promise((resolve, reject) => {
  const loaded = () => document.body.dataset.loaded === "1";
  if (loaded()) return resolve(true);
  const watch = new MutationObserver(() => {
    if (loaded()) { watch.disconnect(); resolve(true); }
  });
  watch.observe(document.body, {attributes: true});
  setTimeout(() => reject(new Error("not loaded: " +
    document.getElementById("error").textContent)), 30000);
})"""

# What the test checks, read from the live page: text, attributes, computed styles, boxes.
PAGE_FACTS = """(() => {
  const key = span => {
    const style = getComputedStyle(span);
    return {text: span.textContent, title: span.title, textOverflow: style.textOverflow,
      overflow: style.overflowX, whiteSpace: style.whiteSpace,
      clientWidth: span.clientWidth, scrollWidth: span.scrollWidth,
      right: span.getBoundingClientRect().right};
  };
  const table = document.querySelector("table");
  return {
    viewport: document.documentElement.clientWidth,
    pageWidth: document.documentElement.scrollWidth,
    tableRight: table.getBoundingClientRect().right,
    tableBox: {clientWidth: table.parentElement.clientWidth,
      scrollWidth: table.parentElement.scrollWidth},
    rows: [...document.querySelectorAll("tr.worker")].map(tr => ({
      tenant: tr.dataset.tenant, state: tr.dataset.state,
      cells: [...tr.cells].map(td => td.textContent),
      idle: tr.querySelector("td.idle").textContent, key: key(tr.querySelector(".key"))})),
    stops: [...document.querySelectorAll("li.stop")].map(li => ({
      tenant: li.dataset.tenant, time: li.querySelector("time").textContent,
      datetime: li.querySelector("time").dateTime,
      reason: li.querySelector(".reason").textContent, key: key(li.querySelector(".key")),
      right: li.getBoundingClientRect().right})),
    sandbox: Object.fromEntries([...document.querySelectorAll("#sandbox li.layer")].map(
      li => [li.dataset.layer, li.querySelector(".status").textContent])),
    injected: document.querySelectorAll("u").length,
  };
})()"""

# The longest key the rule allows (128 characters), no spaces to break at.
LONG_TENANT = ("acme-corporation-eu-west-" * 6)[:128]
DURATION = re.compile(r"^\d+(\.\d)?[smh]$")


def test_dashboard_holds_up_with_a_long_key_and_a_busy_worker(tmp_path: Path) -> None:
    assert len(LONG_TENANT) == 128
    assert "innerHTML" not in DASHBOARD_HTML  # data goes in as text, never as markup
    chromium = find_chromium()
    served = Served("tests.kernels:make", *SERVE_FAST, log=tmp_path / "serve.log")
    try:
        with (
            httpx.Client(timeout=30) as client,
            concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool,
        ):

            def call(tenant: str, method: str, *args: Any) -> Any:
                answer = client.post(
                    f"{served.url}/v1/tenants/{tenant}/call/{method}", json={"args": list(args)}
                )
                assert answer.status_code == 200, answer.text
                return answer.json()["result"]

            # The long key gets a stop (evicted) and then a live worker again.
            call(LONG_TENANT, "whoami")
            assert client.delete(f"{served.url}/v1/tenants/{LONG_TENANT}").json()["evicted"]
            call(LONG_TENANT, "whoami")
            call("alpha", "whoami")
            # A call in flight for "busy" until the test releases it.
            held = pool.submit(call, "busy", "hold", "gate")
            assert call("busy", "wait_entered", "gate") is True
            try:
                stats = client.get(f"{served.url}/v1/workers").json()
                events = client.get(f"{served.url}/v1/events").json()["events"]
                with tempfile.TemporaryDirectory(prefix="corral-dashboard-") as profile:
                    browser = DevTools(
                        chromium, Path(profile), tmp_path / "chromium.log", 1280, 900
                    )
                    try:
                        browser.load(f"{served.url}/")
                        assert browser.evaluate(WAIT_LOADED) is True
                        (tmp_path / "dashboard.png").write_bytes(browser.screenshot())
                        page = browser.evaluate(PAGE_FACTS)
                    finally:
                        browser.close()
            finally:
                assert call("busy", "release", "gate") is True
            assert held.result(timeout=30) == "released gate"
        tree = [p.pid for p in psutil.Process(served.proc.pid).children(recursive=True)]
    finally:
        code = served.stop()
    assert code == 0, (tmp_path / "serve.log").read_text()
    assert wait_pids_exit(tree, timeout=30) == []  # a hang guard

    # Nothing is wider than the window: the page does not scroll sideways, the workers'
    # table fits its panel, the stops fit theirs.
    assert page["pageWidth"] <= page["viewport"] == 1280, page
    assert page["tableRight"] <= page["viewport"], page
    assert page["tableBox"]["scrollWidth"] <= page["tableBox"]["clientWidth"], page
    assert page["injected"] == 0  # nothing the page was sent became markup

    rows = {row["tenant"]: row for row in page["rows"]}
    assert set(rows) == {LONG_TENANT, "alpha", "busy"}, page["rows"]
    # The long key: all of it in the text and the title (the hover), cut on screen.
    for shown in [rows[LONG_TENANT]["key"], *(s["key"] for s in page["stops"])]:
        assert shown["text"] == shown["title"], shown
        if shown["text"] == LONG_TENANT:
            assert shown["textOverflow"] == "ellipsis" and shown["overflow"] == "hidden", shown
            assert shown["whiteSpace"] == "nowrap", shown
            assert shown["scrollWidth"] > shown["clientWidth"] <= 300, shown
            assert shown["right"] <= page["viewport"], shown
    # pid: the worker's, and the kernel's own where it differs (namespaces).
    for worker in stats["workers"]:
        pid, kernel_pid = worker["pid"], worker["kernel_pid"]
        expected = str(pid) if kernel_pid in (None, pid) else f"{pid} (kernel {kernel_pid})"
        assert rows[worker["tenant"]]["cells"][1] == expected, (worker, rows[worker["tenant"]])
    # A busy worker shows no idle time; an idle one does.
    busy = rows["busy"]
    assert busy["state"] == "busy" and busy["cells"][5] == "1", busy
    assert busy["idle"] == "-", busy
    for tenant in ("alpha", LONG_TENANT):
        assert rows[tenant]["state"] == "ready", rows[tenant]
        assert DURATION.match(rows[tenant]["idle"]), rows[tenant]

    # The sandbox layers in force, as stats().sandbox gives them.
    # (each as one line, as LayerStatus's str() writes it)
    shown = {
        layer: str(LayerStatus(status["state"], status.get("detail", "")))
        for layer, status in stats["sandbox"].items()
    }
    assert shown and page["sandbox"] == shown, (page["sandbox"], shown)

    # The stop: its date and time (UTC here), the reason, the key cut like the row's.
    [stop] = page["stops"]
    [event] = [e for e in events if e["kind"] == "stopped"]
    at = datetime.datetime.fromtimestamp(event["at"], datetime.UTC)
    assert stop["tenant"] == LONG_TENANT and stop["reason"] == "evicted", stop
    assert stop["time"] == at.strftime("%Y-%m-%d %H:%M:%S"), (stop, event)
    assert stop["datetime"].startswith(at.strftime("%Y-%m-%dT%H:%M:%S")), (stop, event)
    assert stop["right"] <= page["viewport"], stop


def test_over_a_cluster_each_worker_shows_its_node(tmp_path: Path) -> None:
    """The page fed a cluster's answers (served here as fixed JSON, the shapes of
    ``ClusterStats`` and ``NodeWorkerEvent``): a node column, a Nodes panel, and the node
    of each stop. (tests/cluster/test_gateway.py checks the real answers carry them.)"""
    import http.server
    import threading

    chromium = find_chromium()
    a, b = "a1" * 28, "b2" * 28
    worker = {
        "tenant": "alpha", "pid": 41, "state": "ready", "rss": 3 << 20, "requests": 2,
        "in_flight": 0, "started_at": 1.0, "last_used": 2.0, "stop_reason": None,
        "kernel_pid": 41, "node": a, "node_address": "10.0.0.1",
    }  # fmt: skip
    nodes = [
        {"node": a, "address": "10.0.0.1", "state": "up", "placed": 1, "workers": 1,
         "max_workers": 8, "memory_pressure": None, "error": None},
        {"node": b, "address": "10.0.0.2", "state": "lost", "placed": 0, "workers": 0,
         "max_workers": 8, "memory_pressure": None, "error": None},
    ]  # fmt: skip
    answers = {
        "/": DASHBOARD_HTML.encode(),
        "/v1/workers": json.dumps({
            "state": "running", "max_workers": 16, "workers": [worker], "starts": 2,
            "stops": {"evicted": 1}, "tenants_in_backoff": 0, "memory_enforcement": "none",
            "memory_baseline": None, "memory_pressure": None, "sandbox": {}, "nodes": nodes,
            "node_sandbox": {}, "placements": 1, "limits": {"soft": None, "hard": None},
            "now": 10.0,
        }).encode(),
        "/v1/events": json.dumps({"events": [
            {"kind": "stopped", "tenant": "beta", "at": 5.0, "pid": 42, "reason": "evicted",
             "returncode": 0, "retry_after": None, "node": b, "node_address": "10.0.0.2"},
        ]}).encode(),
    }  # fmt: skip

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = answers.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header(
                "Content-Type", "text/html" if self.path == "/" else "application/json"
            )
            self.end_headers()
            self.wfile.write(body or b"{}")

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, name="fake-gateway")
    thread.start()
    try:
        html = dump_dom(chromium, f"http://127.0.0.1:{server.server_address[1]}/")
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    page = DashboardParser()
    page.feed(html)
    page.close()
    assert page.body.get("data-loaded") == "1", html
    (row,) = page.rows
    assert row.cells[:3] == ["alpha", f"10.0.0.1 {a[:8]}", "41"], row
    assert f'title="Ray node {a}"' in html
    panel = re.search(r'<section id="nodes-panel"( hidden="")?>(.*?)</section>', html, re.S)
    assert panel is not None and panel.group(1) is None, html  # shown
    assert panel.group(2).count('class="layer node"') == 2
    assert "lost, 0 / 8 workers" in panel.group(2) and "up, 1 / 8 workers" in panel.group(2)
    (stop,) = page.stops
    assert stop.tenant == "beta" and f"on 10.0.0.2 {b[:8]}" in stop.text, stop
