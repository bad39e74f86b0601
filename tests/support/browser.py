"""A real browser for the dashboard tests: Debian's headless Chromium driven by its
chromedriver through Selenium, and waits built on WebDriverWait.

Only the Debian packages are used (``/usr/bin/chromium``, ``/usr/bin/chromedriver``):
the driver's path is given to Selenium, so Selenium Manager never runs and nothing is
downloaded. Without them a test skips saying what to install (fails under CI).

Every wait polls a condition with an explicit timeout and says what it waited for;
elements that a live region of the page replaced meanwhile (StaleElementReference) or
that are not there yet are polled again, not failed on.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal, TypeVar, cast

import pytest
from selenium import webdriver
from selenium.common.exceptions import (
    ElementClickInterceptedException,
    ElementNotInteractableException,
    NoSuchElementException,
    StaleElementReferenceException,
    TimeoutException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.wait import WebDriverWait

from tests.support.system_packages import missing_package

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
INSTALL_HINT = "apt-get install -y chromium chromium-driver"
WINDOW = (1400, 1000)
# Long enough for a noisy 2-core machine; a wait returns as soon as its condition holds.
DEFAULT_TIMEOUT = 15.0
POLL = 0.05

# Polled again rather than failed on: the element is not there yet, or a live region
# (data-refresh) replaced it between finding it and using it.
TRANSIENT = (
    NoSuchElementException,
    StaleElementReferenceException,
    ElementClickInterceptedException,
    ElementNotInteractableException,
)

T = TypeVar("T")
Driver = webdriver.Chrome


def require_chromium() -> None:
    """Skip (fail under CI) unless Debian's chromium and chromium-driver are installed."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        missing_package(
            f"dashboard browser tests need Debian's headless Chromium and its driver "
            f"({', '.join(missing)} missing): {INSTALL_HINT}"
        )


@contextmanager
def chromium() -> Iterator[Driver]:
    """A headless Chromium WebDriver, quit on exit (skips when the packages are missing)."""
    require_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        # A page refreshing itself on a timer must keep doing so in a headless window.
        "--disable-background-timer-throttling",
        "--disable-renderer-backgrounding",
    ):
        options.add_argument(argument)
    # An alert a page opened stays open for the test to see (never silently dismissed).
    options.unhandled_prompt_behavior = "ignore"
    # The service's path given: Selenium Manager is skipped (no download, no network).
    service = Service(executable_path=CHROMEDRIVER)
    driver = webdriver.Chrome(options=options, service=service)
    try:
        driver.set_page_load_timeout(30)
        driver.set_script_timeout(15)
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def browser() -> Iterator[Driver]:
    """A fresh headless Chromium for one test (no cookies from another test)."""
    with chromium() as driver:
        yield driver


def wait_until(
    driver: Driver,
    condition: Callable[[Driver], T | Literal[False] | None],
    *,
    what: str,
    timeout: float = DEFAULT_TIMEOUT,
) -> T:
    """Poll ``condition(driver)`` until it returns something truthy (which is returned);
    fail after ``timeout`` seconds saying ``what`` was awaited and where the browser is."""
    wait: WebDriverWait[Driver] = WebDriverWait(
        driver, timeout, poll_frequency=POLL, ignored_exceptions=TRANSIENT
    )
    try:
        value = wait.until(condition)
    except TimeoutException:
        raise AssertionError(
            f"timed out after {timeout}s waiting for {what}; browser at {driver.current_url}, "
            f"page text:\n{_page_text(driver)}"
        ) from None
    return cast(T, value)  # until() returns only a truthy value


def read(
    driver: Driver, reader: Callable[[Driver], T], *, what: str, timeout: float = DEFAULT_TIMEOUT
) -> T:
    """``reader(driver)``'s value (falsy ones too), read again while what it reads is
    missing or was replaced mid-read by a live region of the page."""
    (value,) = wait_until(driver, lambda d: (reader(d),), what=what, timeout=timeout)
    return value


def _page_text(driver: Driver) -> str:
    try:
        text: str = driver.find_element(By.TAG_NAME, "body").text
    except Exception as exc:  # only for the failure message
        return f"<unreadable: {exc!r}>"
    return text[:3000]


def wait_for_element(
    driver: Driver, css: str, *, what: str = "", timeout: float = DEFAULT_TIMEOUT
) -> WebElement:
    """The first element matching ``css``, once there is one."""
    return wait_until(
        driver,
        lambda d: d.find_element(By.CSS_SELECTOR, css),
        what=what or f"an element {css!r}",
        timeout=timeout,
    )


def wait_for_text(
    driver: Driver,
    css: str,
    expected: str,
    *,
    exact: bool = False,
    what: str = "",
    timeout: float = DEFAULT_TIMEOUT,
) -> str:
    """The text of the first element matching ``css`` once it contains (or, ``exact``,
    equals after stripping) ``expected``."""

    def check(d: Driver) -> str | None:
        text: str = d.find_element(By.CSS_SELECTOR, css).text
        matches = text.strip() == expected if exact else expected in text
        return text if matches else None

    return wait_until(
        driver,
        check,
        what=what or f"{css!r} to {'be' if exact else 'contain'} {expected!r}",
        timeout=timeout,
    )


def wait_for_path(
    driver: Driver, path: str, *, what: str = "", timeout: float = DEFAULT_TIMEOUT
) -> str:
    """The current URL once its path (without the query) is ``path`` and the page has
    loaded."""

    def check(d: Driver) -> str | None:
        url: str = d.current_url
        here = url.split("://", 1)[-1].partition("/")[2]
        if "/" + here.partition("?")[0] != path:
            return None
        return url if d.execute_script("return document.readyState") == "complete" else None

    return wait_until(driver, check, what=what or f"the page {path}", timeout=timeout)


def click_button(
    driver: Driver,
    label: str,
    *,
    within: str = "body",
    what: str = "",
    timeout: float = DEFAULT_TIMEOUT,
) -> None:
    """Click the button labelled ``label`` inside the first ``within`` element, finding
    it again if a live region replaced it in the meantime."""
    xpath = f".//button[normalize-space()={_xpath_literal(label)}]"

    def click(d: Driver) -> bool:
        d.find_element(By.CSS_SELECTOR, within).find_element(By.XPATH, xpath).click()
        return True

    wait_until(
        driver, click, what=what or f"a {label!r} button in {within!r} to click", timeout=timeout
    )


def buttons(driver: Driver, within: str = "body") -> list[str]:
    """The labels of every button inside the first ``within`` element (read again if a
    live region replaced one mid-read)."""

    def labels(d: Driver) -> list[str]:
        container = d.find_element(By.CSS_SELECTOR, within)
        return [b.text.strip() for b in container.find_elements(By.TAG_NAME, "button")]

    return read(driver, labels, what=f"the buttons in {within!r}")


def _xpath_literal(text: str) -> str:
    if "'" not in text:
        return f"'{text}'"
    if '"' not in text:
        return f'"{text}"'
    parts = text.split("'")
    return "concat(" + ', "\'", '.join(f"'{p}'" for p in parts) + ")"
