"""The gateway's dashboard (``GET /``) in a real browser: headless Chromium loads it from
a real ``corral serve`` process, runs its script (which polls ``/v1/workers`` and
``/v1/events``), and the rendered DOM is checked.

Needs Debian's ``chromium`` package. Without it the test is skipped, unless ``CI`` is
set: then it fails, so that CI cannot silently stop running it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import httpx
import psutil
import pytest

from tests.helpers import Served, wait_pids_exit

pytestmark = pytest.mark.timeout(120)

FAST = ("--start-timeout", "20", "--shutdown-timeout", "2", "--term-timeout", "1")
CHROMIUM_TIMEOUT = 60.0
# Chosen by the client, shown by the page: must come out as text, never as markup.
ODD_TENANT = "gamma&<injected>"


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
            members = group_members(browser.pid)
            if members:
                os.killpg(browser.pid, signal.SIGKILL)
            browser.wait()
            left = wait_pids_exit(members, timeout=10)
        assert not left, f"chromium processes outlived the kill: {left}"
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
    served = Served(*FAST, log=tmp_path / "serve.log")
    try:
        pids: dict[str, int] = {}
        with httpx.Client(timeout=30) as client:
            for tenant in ("alpha", "beta", ODD_TENANT):
                answer = client.post(f"{served.url}/v1/tenants/{tenant}/call/whoami", json={})
                assert answer.status_code == 200, answer.text
                pids[tenant] = answer.json()["result"]["pid"]
            evicted = client.delete(f"{served.url}/v1/tenants/beta")
            assert evicted.json() == {"tenant": "beta", "evicted": True}
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
    assert "injected" not in page.tags  # the odd tenant's name was shown as text, not markup
    beta = [stop for stop in page.stops if stop.tenant == "beta"]
    assert len(beta) == 1, page.stops
    assert beta[0].reason == "evicted" and "beta" in beta[0].text, beta
    assert {stop.tenant for stop in page.stops} == {"beta"}, page.stops
