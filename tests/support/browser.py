"""A real Chromium (Debian's ``chromium``) driven by Playwright, one per test session.

Playwright never downloads a browser here: it launches ``/usr/bin/chromium``
(scripts/bootstrap.sh installs it). Pages run under the console's real
Content-Security-Policy; only the accessibility check opens a context that
bypasses it, to inject axe-core. Screenshots go to the session's temporary
directory (:func:`shots_dir`).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

CHROMIUM = "/usr/bin/chromium"
AXE = Path(__file__).parent / "vendor" / "axe.min.js"


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """One headless Chromium per test module.

    Not per session: Playwright's sync API keeps an asyncio loop running in
    the main thread while it is open, and tests in later modules that call
    ``asyncio.run`` would fail with "cannot be called from a running event loop".
    """
    if shutil.which("chromium") is None and not Path(CHROMIUM).exists():
        pytest.fail("chromium not found: run scripts/bootstrap.sh (Debian package chromium)",
                    pytrace=False)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        launched = pw.chromium.launch(executable_path=CHROMIUM)
        yield launched
        launched.close()


@pytest.fixture(scope="session")
def axe_script() -> Path:
    """The vendored axe-core, for the accessibility check only."""
    return AXE


@pytest.fixture(scope="session")
def shots_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where this session's screenshots go."""
    return tmp_path_factory.mktemp("console-screenshots")


class Console:
    """One browser context signed in to a console (its own cookies)."""

    def __init__(self, browser: object, base_url: str, shots: Path, **options: object) -> None:
        self.context = browser.new_context(base_url=base_url, **options)  # type: ignore[attr-defined]
        self.page = self.context.new_page()
        self.base_url = base_url
        self.shots = shots
        #: console messages the page logged (CSP violations show up here)
        self.console: list[str] = []
        self.dialogs: list[str] = []
        self.page.on("console", lambda msg: self.console.append(f"{msg.type}: {msg.text}"))
        self.page.on("dialog", self._dialog)

    def _dialog(self, dialog: object) -> None:
        self.dialogs.append(dialog.message)  # type: ignore[attr-defined]
        dialog.dismiss()  # type: ignore[attr-defined]

    def sign_in(self, credential: str, path: str = "/ui/") -> Console:
        """Sign in through the form, as a person would."""
        self.page.goto(path)
        self.page.fill("#credential", credential)
        self.page.click("button[type=submit]")
        # The sign-in page's own URL ends in ``?next=/ui/``: judge the path alone,
        # so the wait ends when the form's redirect has landed, not at once.
        self.page.wait_for_url(lambda url: not urlsplit(url).path.startswith("/ui/sign-in"))
        self.page.wait_for_load_state()
        return self

    def shoot(self, name: str) -> Path:
        """A full-page screenshot named ``name`` in the session's directory."""
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def csp_violations(self) -> list[str]:
        """Console messages about the Content-Security-Policy."""
        return [m for m in self.console if "Content Security Policy" in m]

    def csrf(self) -> str:
        """The CSRF token the current page's forms carry."""
        return self.page.locator("input[name=csrf]").first.get_attribute("value") or ""

    def close(self) -> None:
        """Close the context (its cookies go with it)."""
        self.context.close()


@pytest.fixture
def console(browser: Any, console_url: str, shots_dir: Path) -> Iterator[Callable[..., Console]]:
    """Factory: a fresh browser context on the console at ``console_url`` (a fixture the
    test module provides), each closed after the test."""
    opened: list[Console] = []

    def make(**options: Any) -> Console:
        made = Console(browser, console_url, shots_dir, **options)
        opened.append(made)
        return made

    yield make
    for made in opened:
        made.close()
