"""The serve dashboard as a person sees it: a real `inferos serve` app (uvicorn on 127.0.0.1, stories260K
ONNX sessions) with requests flowing, the page opened in headless Chromium (Debian's ``chromium`` driven by
Playwright, no browser download), read and clicked like a person would.
"""

from __future__ import annotations

import re
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from _server import serve  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
INSTALL = "apt-get install -y chromium chromium-driver && pip install playwright"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TOKEN = "dashboard-test-token"


@contextmanager
def load(client: Any) -> Iterator[None]:
    """Completions sent back to back in a thread while the block runs; a failed one fails the test (first)."""
    stop = threading.Event()
    failed: list[str] = []

    def loop() -> None:
        while not stop.is_set():
            r = client.post("/api/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 48})
            if r.status_code != 200:
                failed.append(f"{r.status_code} {r.text}")

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=60)
        assert not failed, f"the server failed {len(failed)} requests: {failed[0]}"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is absent: {INSTALL}")
    sync_api = pytest.importorskip("playwright.sync_api", reason=f"playwright is absent: {INSTALL}")
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def served(stories_onnx: Path) -> Iterator[tuple[str, Any]]:
    with serve(stories_onnx) as pair:
        yield pair


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1400, "height": 1100})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    yield pg
    context.close()
    # no script error, no resource refused by the CSP, no 404 (the API's 422 answers are expected: the form test)
    assert not [e for e in errors if "status of 422" not in e], errors


def refreshes(page: Any) -> int:
    return int(page.get_attribute("body", "data-refreshes") or 0)


def until(check: Any, timeout: float = 15.0) -> None:
    """Poll ``check()`` from Python until it is true (the page's CSP forbids the eval that Playwright's
    ``wait_for_function`` needs, and it should: the page runs no string as code)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {check.__doc__ or check}"
        time.sleep(0.05)


def wait_refreshes(page: Any, count: int = 2) -> None:
    """Wait until the page has redrawn ``count`` more times (each redraw reads every route anew)."""
    start = refreshes(page)
    until(lambda: refreshes(page) >= start + count)


def text(page: Any, key: str) -> str:
    return page.locator(f'[data-key="{key}"]').first.inner_text().strip()


def number(shown: str) -> float | None:
    """The number a card shows, scaled to the unit the API uses for it (KiB/MiB/GiB -> bytes); None for n/a."""
    if shown.startswith("n/a"):
        return None
    match = re.match(r"(-?[0-9.]+)\s*(B|KiB|MiB|GiB)?", shown)
    assert match, shown
    scale = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}.get(match.group(2) or "", 1)
    return float(match.group(1)) * scale


def shows(shown: str, value: float | None, digits: float) -> bool:
    """``shown`` is ``value`` at the page's display precision (``digits``: the last digit's weight)."""
    got = number(shown)
    if value is None or got is None:
        return got is None and value is None
    return abs(got - value) <= digits * 0.5 + 1e-9


def points(page: Any, chart: str) -> int:
    return int(page.get_attribute(f"#chart-{chart}", "data-points") or 0)


def test_root_redirects_to_a_self_contained_page(served: tuple[str, Any]) -> None:
    _, client = served
    r = client.get("/", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "/dashboard"
    r = client.get("/dashboard")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    # nothing fetched from elsewhere: no external script, style, font or image
    assert not re.findall(r"""(?:src|href)\s*=\s*["'](?!data:|#)""", r.text)
    assert "@import" not in r.text and "url(" not in r.text


def test_cards_charts_and_baseline_follow_the_server(served: tuple[str, Any], page: Any, tmp_path: Path) -> None:
    url, client = served
    page.goto(url + "/")
    assert page.url.endswith("/dashboard")
    wait_refreshes(page, 1)
    page.click("#baseline")  # the baseline toggle: requests now run the plain cache
    until(lambda: page.get_attribute("#baseline", "aria-pressed") == "true")
    assert client.get("/v1/policy").json()["baseline_mode"] is True
    with load(client):
        before = {c: points(page, c) for c in ("tps", "kv")}
        time.sleep(2)
        until(lambda: text(page, "tps-delta").startswith("baseline mode on: measuring the baseline ("))
        page.click("#baseline")
        until(lambda: page.get_attribute("#baseline", "aria-pressed") == "false")
        assert client.get("/v1/policy").json()["baseline_mode"] is False
        time.sleep(2)
        until(lambda: "% vs baseline" in text(page, "tps-delta"))
        after = {c: points(page, c) for c in ("tps", "kv")}
        assert after["tps"] > before["tps"] and after["kv"] > before["kv"], (before, after)
        page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000
    # the baseline toggles are marked on the time axis
    assert int(page.get_attribute("#chart-tps", "data-markers") or 0) >= 2
    assert "baseline" in page.inner_text("#decisions")
    # the change against the baseline measured here: requests seen in baseline mode vs with the current policy
    for key in ("tps-delta", "ttft-delta", "kv-delta"):
        assert re.match(r"[+-][0-9.]+ % vs baseline \(.* vs .*; [0-9]+ vs [0-9]+ requests", text(page, key)), text(page, key)

    for _ in range(50):  # idle: the numbers stop moving
        m = client.get("/v1/metrics").json()
        if m["requests"]["active"] == 0 and m["requests"]["queued"] == 0:
            break
        time.sleep(0.1)
    first = client.get("/v1/metrics").json()
    wait_refreshes(page, 2)
    shown = {k: text(page, k) for k in ("tps", "ftl_ms", "p95_ms", "active", "queued", "kv_bytes", "rss_now",
                                        "delta_ppl", "cpu", "completed")}
    last = client.get("/v1/metrics").json()

    def same(key: str, pick: Any, digits: float) -> None:
        assert any(shows(shown[key], pick(m), digits) for m in (first, last)), (key, shown[key], pick(first), pick(last))

    same("tps", lambda m: m["tps"], 0.1)
    same("ftl_ms", lambda m: m["ftl_ms"], 0.1)
    same("p95_ms", lambda m: m["p95_ms"], 0.1)
    same("active", lambda m: m["requests"]["active"], 1)
    same("queued", lambda m: m["requests"]["queued"], 1)
    kv = number(shown["kv_bytes"])
    assert kv is not None and abs(kv - last["mem"]["kv_mb"] * 1e6) <= 0.05 * 1024 ** (1 if kv < 1024**2 else 2) + 1
    assert shown["completed"].startswith(f"{last['requests']['completed']} completed")
    rss = number(shown["rss_now"].removeprefix("now "))
    assert rss is not None and abs(rss - last["mem"]["rss_gb"] * 1e9) < 0.05 * last["mem"]["rss_gb"] * 1e9
    assert shown["delta_ppl"] == "n/a" and last["quality"]["delta_ppl_est"] is None  # no auto-tuner: no estimate
    cpu = last["util"]["cpu"]
    assert (shown["cpu"] == "n/a") if cpu is None else shown["cpu"].endswith("%")
    for dev in ("gpu", "npu"):
        if last["util"][dev] is None:
            assert text(page, dev) == "n/a" and text(page, f"{dev}_reason")  # n/a with its reason


def test_policy_form_shows_the_422_and_applies_a_good_value(served: tuple[str, Any], page: Any) -> None:
    url, client = served
    page.goto(url + "/dashboard")
    wait_refreshes(page, 1)
    before = client.get("/v1/policy").json()
    field = "#f-kv-recent_window"

    page.fill(field, "1")  # below the schema's minimum
    page.click("#policy-form button[type=submit]")
    until(lambda: page.inner_text("#policy-error") != "")
    expected = client.post("/v1/policy", json={"kv": {"recent_window": 1}})  # the same request: 422, no change
    assert expected.status_code == 422
    assert page.inner_text("#policy-error") == expected.json()["error"]["message"]
    assert "recent_window" in page.inner_text("#policy-error")
    assert client.get("/v1/policy").json() == before  # nothing changed

    page.fill(field, "abc")  # not a number: sent as typed, the server says why
    page.click("#policy-form button[type=submit]")
    until(lambda: "integer" in page.inner_text("#policy-error"))
    assert client.get("/v1/policy").json() == before

    page.fill(field, "48")
    page.select_option("#f-kv-quant", "int8")
    page.click("#policy-form button[type=submit]")
    until(lambda: page.inner_text("#policy-ok").startswith("applied"))
    after = client.get("/v1/policy").json()
    assert after["version"] == before["version"] + 1
    assert after["policy"]["kv"]["recent_window"] == 48 and after["policy"]["kv"]["quant"] == "int8"
    assert page.inner_text("#policy-error") == ""
    assert f"applied: policy version {after['version']}" == page.inner_text("#policy-ok")
    wait_refreshes(page, 1)
    table = page.inner_text("#policy-table")
    assert "48 tokens" in table and "int8" in table
    history = client.get("/v1/history", params={"limit": 10000}).json()["items"]
    assert any(i["type"] == "decision" and i["kind"] == "policy" for i in history)
    client.post("/v1/policy", json=before["policy"])  # leave the module's server as it was


def test_off_loopback_rule_the_page_asks_for_the_token(stories_onnx: Path, browser: Any) -> None:
    with serve(stories_onnx, token=TOKEN) as (url, client):
        bare = httpx.Client(base_url=url, timeout=30)
        for path in ("/v1/metrics", "/v1/history", "/v1/policy", "/v1/health", "/metrics"):
            r = bare.get(path, follow_redirects=False)
            assert r.status_code == 401 and "<html" not in r.text, path  # no data is served without it
        page_html = bare.get("/dashboard").text  # the shell carries no data: it asks for the token
        assert "<html" in page_html and client.get("/v1/health").json()["model"] not in page_html
        assert bare.get("/", follow_redirects=False).status_code in (302, 307)
        assert bare.post("/v1/policy", json={"kv": {"recent_window": 32}}).status_code == 401
        bare.close()
        assert "<html" in client.get("/dashboard").text  # with the token, the page

        context = browser.new_context()
        page = context.new_page()
        # the shell is served without the token; every call the page makes must carry it: it asks for it
        page.goto(url + "/dashboard")
        page.wait_for_selector("#token-form", state="visible")
        assert page.is_hidden("#main")
        page.fill("#token", "wrong")
        page.click("#token-form button[type=submit]")
        until(lambda: "refused" in page.inner_text("#token-error"))
        page.fill("#token", TOKEN)
        page.click("#token-form button[type=submit]")
        until(lambda: refreshes(page) >= 1)
        assert page.is_visible("#main") and page.is_hidden("#token-form")
        assert client.get("/v1/health").json()["model"] in page.inner_text("#model")
        context.close()
