"""The console in a real browser: Debian's headless Chromium driven by Selenium through Debian's chromedriver, against
the shared server; the tiles it draws must be the products gRPC answers."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest

pytest.importorskip("selenium", reason="the console's browser test needs selenium (the dev extra)")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from lookalike.v1 import lookalike_pb2 as pb
from lookalike.v1 import lookalike_pb2_grpc as pb_grpc
from tests import helpers

pytestmark = pytest.mark.e2e
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOT = helpers.REPO / "build" / "console.png"
K = 12
WAIT_S = 30


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        reason = ("the console's browser test needs Debian's chromium and chromium-driver: as root, "
                  "apt-get install chromium chromium-driver (make test installs them when it runs as root)")
        # As root (CI), make test installs them: missing there is a failure, not a reason to skip.
        if os.geteuid() == 0:
            pytest.fail(reason)
        pytest.skip(reason)
    # No Selenium Manager: the driver is Debian's, and nothing is downloaded.
    os.environ["SE_OFFLINE"] = "true"
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1400,1000", "--disable-extensions", "--no-first-run"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def stub(served):
    with grpc.insecure_channel(served.address) as channel:
        yield pb_grpc.ImageSimilarityStub(channel)


def _wait_answer(driver, action) -> list[str]:
    """Runs `action`, waits for the console to draw its answer and every tile's picture, and returns the tiles'
    product ids in order."""
    driver.execute_script("const status = document.getElementById('status'); "
                          "if (status) status.dataset.state = 'stale'")
    action()
    wait = WebDriverWait(driver, WAIT_S)
    wait.until(lambda d: d.find_element("id", "status").get_attribute("data-state") in ("done", "error"))
    status = driver.find_element("id", "status")
    assert status.get_attribute("data-state") == "done", status.text
    wait.until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('.tile-image')].every((img) => img.complete)"))
    widths = driver.execute_script("return [...document.querySelectorAll('.tile-image')].map((i) => i.naturalWidth)")
    assert widths and all(width > 0 for width in widths), widths
    return [tile.get_attribute("data-product-id") for tile in driver.find_elements("css selector", ".tile")]


def _grpc_products(stub, **fields) -> list[str]:
    request = pb.FindSimilarRequest(k=K, with_attributes=True, **fields)
    return [match.product_id for match in stub.FindSimilar(request, timeout=30).matches]


def test_console_queries_a_product_a_filter_a_photo_and_a_recommendation(served, browser, stub, catalogue):
    listing = helpers.first_listing(catalogue)
    product_id = listing["item_id"]
    tiles = _wait_answer(browser, lambda: browser.get(f"{served.http_url}/#product={product_id}"))
    assert "version" in browser.find_element("id", "info").text
    assert len(tiles) == K and tiles == _grpc_products(stub, product_id=product_id)
    # The plan that answered (the session build has neighbour lists, or this answer came from the result cache).
    assert any(f"plan {plan}" in browser.find_element("id", "status").text
               for plan in ("neighbour_list", "result_cache")), browser.find_element("id", "status").text
    assert "delta 0" in browser.find_element("id", "status").text  # the session build has no deltas

    # A result is a link that makes it the query.
    first = tiles[0]
    tiles = _wait_answer(browser, lambda: browser.find_element("css selector", ".tile").click())
    assert first in browser.find_element("id", "query-view").text
    assert tiles == _grpc_products(stub, product_id=first)

    # A filter offered from the version's attributes.
    Select(browser.find_element("id", "filter-key")).select_by_value("product_type")
    value = Select(browser.find_element("id", "filter-value")).first_selected_option.get_attribute("value")
    Select(browser.find_element("id", "filter-mode")).select_by_value("noneOf")
    browser.find_element("id", "add-filter").click()
    tiles = _wait_answer(browser, lambda: browser.find_element("id", "run").click())
    clause = pb.Filter(clauses=[pb.Clause(key="product_type", none_of=[value])])
    assert tiles == _grpc_products(stub, product_id=first, filter=clause) and len(tiles) == K

    # A photo upload (the filter still applies).
    rows = {row["image_id"]: row for row in helpers.catalogue_images(catalogue)}
    photo = catalogue / "small" / rows[listing["main_image_id"]]["path"]
    tiles = _wait_answer(browser, lambda: browser.find_element("id", "photo").send_keys(str(photo)))
    assert tiles == _grpc_products(stub, image=photo.read_bytes(), filter=clause) and len(tiles) == K

    # Recommend from two products, away from a third (the filter still applies).
    positive, negative = [product_id, tiles[1]], [tiles[2]]
    browser.find_element("id", "positive").send_keys(" ".join(positive))
    browser.find_element("id", "negative").send_keys(negative[0])
    tiles = _wait_answer(browser, lambda: browser.find_element("id", "recommend").click())
    request = pb.RecommendRequest(positive=[pb.Example(product_id=p) for p in positive],
                                  negative=[pb.Example(product_id=n) for n in negative], k=K, with_attributes=True,
                                  strategy=pb.RECOMMEND_STRATEGY_AVERAGE_VECTOR, filter=clause, ignore_missing=True)
    assert tiles == [m.product_id for m in stub.Recommend(request, timeout=30).matches] and len(tiles) == K
    SCREENSHOT.parent.mkdir(exist_ok=True)
    browser.save_screenshot(str(SCREENSHOT))
    assert SCREENSHOT.stat().st_size > 10_000


def test_console_shows_a_clear_error(served, browser):
    browser.get(f"{served.http_url}/#product=no-such-product")
    WebDriverWait(browser, WAIT_S).until(
        lambda d: d.find_element("id", "status").get_attribute("data-state") == "error")
    assert "NOT_FOUND" in browser.find_element("id", "status").text
    assert browser.find_element("id", "query").is_displayed()
