"""The console in a real browser: Debian's headless Chromium driven by Selenium through Debian's chromedriver, against
the shared server; the tiles it draws must be the products gRPC answers."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pandas as pd
import pytest

pytest.importorskip("selenium", reason="the console's browser test needs selenium (the dev extra)")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from lookalike import artifacts
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


def _wait_query_picture(driver) -> str:
    """Waits for the query view's picture to load and returns its alt text (the image id it shows)."""
    WebDriverWait(driver, WAIT_S).until(lambda d: d.execute_script(
        "const img = document.querySelector('#query-view img'); return img && !img.hidden && img.complete && "
        "img.naturalWidth > 0"))
    return driver.find_element("css selector", "#query-view img").get_attribute("alt")


def _product_images(built) -> dict[str, list[str]]:
    """Each product's image ids in the served version, main first (its rows' order), read from its tables."""
    images = pd.read_parquet(built / artifacts.read_current(built) / artifacts.IMAGES_FILE,
                             columns=["row", "product_id", "image_id"]).sort_values("row")
    return {product: list(group["image_id"]) for product, group in images.groupby("product_id", sort=False)}


def _grpc_products(stub, **fields) -> list[str]:
    request = pb.FindSimilarRequest(k=K, with_attributes=True, **fields)
    return [match.product_id for match in stub.FindSimilar(request, timeout=30).matches]


def test_console_queries_a_product_a_filter_a_photo_and_a_recommendation(served, browser, stub, catalogue, built):
    listing = helpers.first_listing(catalogue)
    product_id = listing["item_id"]
    images_of = _product_images(built)
    tiles = _wait_answer(browser, lambda: browser.get(f"{served.http_url}/#product={product_id}"))
    assert "version" in browser.find_element("id", "info").text
    assert len(tiles) == K and tiles == _grpc_products(stub, product_id=product_id)
    # The query's picture: the product's main image.
    assert _wait_query_picture(browser) == images_of[product_id][0] == listing["main_image_id"]
    # The plan that answered (the session build has neighbour lists, or this answer came from the result cache).
    assert any(f"plan {plan}" in browser.find_element("id", "status").text
               for plan in ("neighbour_list", "result_cache")), browser.find_element("id", "status").text
    assert "delta 0" in browser.find_element("id", "status").text  # the session build has no deltas

    # A result's other images, on request: all of the product's, main first, each loaded.
    position, shown = next((n, p) for n, p in enumerate(tiles) if len(images_of[p]) > 1)
    browser.find_elements("css selector", ".other-images")[position].click()
    others = f".tile:nth-child({position + 1}) .others img"
    WebDriverWait(browser, WAIT_S).until(lambda d: len(d.find_elements("css selector", others)) == len(
        images_of[shown]) and d.execute_script(
            f"return [...document.querySelectorAll('{others}')].every((i) => i.complete && i.naturalWidth > 0)"))
    assert [img.get_attribute("alt") for img in browser.find_elements("css selector", others)] == images_of[shown]

    # A result is a link that makes it the query.
    first = tiles[0]
    tiles = _wait_answer(browser, lambda: browser.find_element("css selector", ".tile-link").click())
    assert first in browser.find_element("id", "query-view").text
    assert tiles == _grpc_products(stub, product_id=first)
    # The tile of the product already in the address runs it again (there is no hashchange): here the address is
    # set without running it, so only the click can draw the answer.
    again = tiles[1]
    browser.execute_script("history.replaceState(null, '', '#product=' + encodeURIComponent(arguments[0]))", again)
    tiles = _wait_answer(browser, lambda: browser.find_elements("css selector", ".tile-link")[1].click())
    assert again in browser.find_element("id", "query-view").text
    assert tiles == _grpc_products(stub, product_id=again)

    # By image id: the image is the query's picture.
    image_id = listing["main_image_id"]
    tiles = _wait_answer(browser, lambda: browser.get(f"{served.http_url}/#image={image_id}"))
    assert _wait_query_picture(browser) == image_id
    assert tiles == _grpc_products(stub, image_id=image_id) and len(tiles) == K

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
    assert "plan " in browser.find_element("id", "status").text
    # The README's picture: a photo with a filter, a result's images shown, the version and plan on the status line.
    position = next(n for n, p in enumerate(tiles) if len(images_of[p]) > 1)
    browser.find_elements("css selector", ".other-images")[position].click()
    WebDriverWait(browser, WAIT_S).until(lambda d: d.execute_script(
        "const imgs = [...document.querySelectorAll('.others img')]; "
        "return imgs.length > 1 && imgs.every((i) => i.complete && i.naturalWidth > 0)"))
    SCREENSHOT.parent.mkdir(exist_ok=True)
    browser.save_screenshot(str(SCREENSHOT))
    assert SCREENSHOT.stat().st_size > 10_000

    # Recommend from two products, away from a third (the filter still applies).
    positive, negative = [product_id, tiles[1]], [tiles[2]]
    browser.find_element("id", "positive").send_keys(" ".join(positive))
    browser.find_element("id", "negative").send_keys(negative[0])
    tiles = _wait_answer(browser, lambda: browser.find_element("id", "recommend").click())
    request = pb.RecommendRequest(positive=[pb.Example(product_id=p) for p in positive],
                                  negative=[pb.Example(product_id=n) for n in negative], k=K, with_attributes=True,
                                  strategy=pb.RECOMMEND_STRATEGY_AVERAGE_VECTOR, filter=clause, ignore_missing=True)
    assert tiles == [m.product_id for m in stub.Recommend(request, timeout=30).matches] and len(tiles) == K

    # Everything the console loaded came from the server that serves it.
    loaded = browser.execute_script("return performance.getEntriesByType('resource').map((entry) => entry.name)")
    origin = served.http_url
    assert loaded and all(name.startswith((origin + "/", "blob:" + origin + "/")) for name in loaded), loaded


def test_console_shows_a_clear_error(served, browser):
    browser.get(f"{served.http_url}/#product=no-such-product")
    WebDriverWait(browser, WAIT_S).until(
        lambda d: d.find_element("id", "status").get_attribute("data-state") == "error")
    assert "NOT_FOUND" in browser.find_element("id", "status").text
    assert browser.find_element("id", "query").is_displayed()
