"""Browser tests of the live page: Debian's chromium driven by Playwright.

The browser is the system's /usr/bin/chromium (apt package `chromium`), never
one Playwright downloads; the Python package is `playwright` (in the test
extras). Both come with the README's test command; when one is missing the
tests fail and say what to install (they never skip).

Each test gets its own harness (`serve`) and a fresh browser context
(`page`); the browser itself is started once per session. The page's console
is watched: an uncaught exception in the page, or any console error that
does not come from a captured message's sandboxed frame, fails the test.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from harness.testing import Harness

if TYPE_CHECKING:
    from playwright.sync_api import Browser, ConsoleMessage, Page

CHROMIUM = os.environ.get("HARNESS_CHROMIUM", "/usr/bin/chromium")
#: No network beyond loopback here: everything that phones home is off.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions", "--no-default-browser-check",
]
INSTALL = ("install them with the README's test command: "
           "`DEBIAN_FRONTEND=noninteractive apt-get install -y chromium` (as root) and "
           "`.venv/bin/pip install -e '.[test]'` (it brings the `playwright` Python package; "
           "do not run `playwright install`, the tests use Debian's chromium)")
WIDTH, HEIGHT = 1600, 900


#: The event loop of the session's Playwright (its sync API runs one).
_PLAYWRIGHT_LOOP: list[asyncio.AbstractEventLoop] = []


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        pytest.fail(f"the browser tests need the Python package playwright; {INSTALL}",
                    pytrace=False)
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"the browser tests need chromium at {CHROMIUM}; {INSTALL}", pytrace=False)
    with sync_playwright() as p:
        try:
            # Playwright starts it with a fresh temporary profile of its own.
            b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
                                  timeout=30_000)
        except Error as e:
            pytest.fail(f"chromium at {CHROMIUM} did not start: {e}", pytrace=False)
        _PLAYWRIGHT_LOOP[:] = [asyncio.get_running_loop()]
        try:
            yield b
        finally:
            asyncio._set_running_loop(_PLAYWRIGHT_LOOP[0])
            b.close()


@pytest.fixture(autouse=True)
def _playwright_loop_only_in_browser_tests(browser: Browser) -> Iterator[None]:
    """Playwright's sync API marks its event loop as running in this thread
    between calls. The browser lives for the whole session, and other tests
    in the same process (pytest -n: any test may share a worker) call
    asyncio.run(), which refuses to start while a loop is marked running. So
    the mark is set for browser tests only, and lifted between them."""
    asyncio._set_running_loop(_PLAYWRIGHT_LOOP[0])
    try:
        yield
    finally:
        asyncio._set_running_loop(None)


@pytest.fixture
def serve() -> Iterator[Callable[..., Harness]]:
    """serve(scenario=None, **kw): a running Harness with the web page on."""
    running: list[Harness] = []

    def start(scenario: Any = None, **kw: Any) -> Harness:
        h = Harness(scenario, http=True, **kw).start()
        running.append(h)
        return h

    yield start
    for h in reversed(running):
        h.stop()


class Console:
    """What the page said on its console, and what it threw."""

    def __init__(self) -> None:
        self.messages: list[ConsoleMessage] = []
        self.page_errors: list[Exception] = []

    def errors(self) -> list[ConsoleMessage]:
        return [m for m in self.messages if m.type == "error"]

    def page_origin_errors(self) -> list[str]:
        """Console errors not raised for a captured message's sandboxed frame
        (for that frame the browser reports what it refused to do)."""
        mail = re.compile(r"/api/v1/messages/\d+/(html|raw)$")
        return [f"{m.text} ({m.location.get('url')})" for m in self.errors()
                if not mail.search(m.location.get("url") or "")]


@pytest.fixture
def console() -> Console:
    return Console()


@pytest.fixture
def page(browser: Browser, serve: Callable[..., Harness], console: Console) -> Iterator[Page]:
    """A fresh context at projector size; closed before the harness stops (it
    depends on `serve`), so the page never sees the server go away."""
    context = browser.new_context(viewport={"width": WIDTH, "height": HEIGHT},
                                  locale="en-GB", timezone_id="UTC",
                                  service_workers="block")
    context.set_default_timeout(5_000)
    pg = context.new_page()
    pg.on("console", lambda m: console.messages.append(m))
    pg.on("pageerror", lambda e: console.page_errors.append(e))
    yield pg
    context.close()
    assert not console.page_errors, f"the page threw: {console.page_errors}"
    assert not console.page_origin_errors(), \
        f"console errors on the page: {console.page_origin_errors()}"
