"""The web chat in headless Debian chromium: ask, watch the thinking and the answer appear, offline.

Driven by playwright's Python API against the system chromium (`executable_path`), never a
downloaded browser. The screenshot lands in artifacts/ (gitignored) for a person to look at.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def ui_url(engine):
    from thinktime import Thinker
    from thinktime.server.background import free_port
    from thinktime.ui.app import launch

    thinker = Thinker(engine=engine, max_new_tokens=24)
    port = free_port()
    demo = launch(thinker, host="127.0.0.1", port=port, block=False)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        print("SKIP reason: Debian chromium is not installed (apt-get install chromium chromium-driver)")
        pytest.skip("Debian chromium is not installed (apt-get install chromium chromium-driver)")
    playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield browser
        browser.close()


def test_ask_see_thinking_then_answer_offline(browser, ui_url):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    foreign: list[str] = []
    page.on("request", lambda r: foreign.append(r.url) if urlparse(r.url).hostname not in
            ("127.0.0.1", "localhost", None) and not r.url.startswith(("data:", "blob:")) else None)
    page.goto(ui_url, wait_until="load", timeout=60_000)
    page.locator("#question textarea").wait_for(timeout=60_000)
    page.locator("#question textarea").fill("What is 3 plus 4?")
    page.locator("#send").click()
    chat = page.locator("#chat")
    # the thinking panel appears (collapsible, titled) while the chain streams into it
    page.get_by_text("Thinking", exact=False).first.wait_for(timeout=60_000)
    saw_partial = False
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        text = chat.inner_text()
        if "Thought for" in text:
            break
        saw_partial = saw_partial or "Thinking…" in text
        time.sleep(0.1)
    text = chat.inner_text()
    assert "Thought for" in text, text  # finished: the panel title says how long it thought
    assert "What is 3 plus 4?" in text
    assert saw_partial, "the thinking panel never showed its pending state while streaming"
    # the answer sits below the panel (24 tokens cut this chain short: the UI says so)
    assert "no answer" in text or "Answer:" in text, text
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "ui_chat.png"), full_page=True)
    # the panel is collapsible: its title folds the chain of thought away
    page.get_by_text("Thought for", exact=False).first.click()
    page.screenshot(path=str(ARTIFACTS / "ui_chat_thinking_collapsed.png"), full_page=True)
    # a second turn keeps the conversation
    page.locator("#question textarea").fill("What is 3+4? Put the answer in \\boxed{}.")
    page.locator("#send").click()
    page.wait_for_function("document.querySelector('#chat').innerText.split('Thought for').length > 2",
                           timeout=120_000)
    text = chat.inner_text()
    assert "What is 3 plus 4?" in text and "Put the answer in" in text
    second = text.split("Put the answer in")[-1]
    assert text.count("Thought for") == 2 and ("Answer:" in second or "no answer" in second), text
    page.screenshot(path=str(ARTIFACTS / "ui_chat_two_turns.png"), full_page=True)
    assert not foreign, f"the page loaded from other hosts: {foreign}"
    page.close()


@pytest.fixture(scope="module")
def long_ui_url(engine):
    """The same page with room for long chains, so that Stop has something to stop."""
    from thinktime import Thinker
    from thinktime.server.background import free_port
    from thinktime.ui.app import launch

    port = free_port()
    demo = launch(Thinker(engine=engine, max_new_tokens=400), host="127.0.0.1", port=port, block=False)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def test_stop_finishes_the_panel_and_text_typed_meanwhile_is_kept(browser, long_ui_url):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(long_ui_url, wait_until="load", timeout=60_000)
    box = page.locator("#question textarea")
    box.wait_for(timeout=60_000)
    box.fill("Write a long story about a dragon.")
    page.locator("#send").click()
    page.get_by_text("Thinking…", exact=False).first.wait_for(timeout=60_000)
    box.fill("What is 9 times 9?")  # typed while the answer streams: kept, and Enter starts no second turn
    box.press("Enter")
    page.locator("#stop").click()
    page.wait_for_function("document.querySelector('#chat').innerText.includes('Stopped after')", timeout=60_000)
    assert box.input_value() == "What is 9 times 9?"
    text = page.locator("#chat").inner_text()
    assert "9 times 9" not in text and "Thinking…" not in text, text
    page.locator("#clear").click()
    page.wait_for_function("!document.querySelector('#chat').innerText.includes('dragon')", timeout=30_000)
    page.close()


def test_stop_also_stops_a_turn_waiting_in_the_queue_and_dollars_stay_text(browser, long_ui_url):
    first, second = (browser.new_page(viewport={"width": 1280, "height": 900}) for _ in range(2))
    for page in (first, second):
        page.goto(long_ui_url, wait_until="load", timeout=60_000)
        page.locator("#question textarea").wait_for(timeout=60_000)
    first.locator("#question textarea").fill("I had $5 and got $10. Write a long story about a dragon.")
    first.locator("#send").click()
    first.get_by_text("Thinking…", exact=False).first.wait_for(timeout=60_000)
    second.locator("#question textarea").fill("What is 9 times 9?")
    second.locator("#send").click()  # the engine is busy with the first tab: this turn waits in the queue
    time.sleep(1.0)
    second.locator("#stop").click()
    first.locator("#stop").click()
    first.wait_for_function("document.querySelector('#chat').innerText.includes('Stopped after')", timeout=60_000)
    assert "I had $5 and got $10." in first.locator("#chat").inner_text()  # money, not inline math
    time.sleep(5.0)  # the queue has moved on: the stopped turn must not have run
    assert "9 times 9" not in second.locator("#chat").inner_text()
    for page in (first, second):
        page.close()
