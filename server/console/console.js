// The lookalike console: calls the server's JSON API (protobuf's canonical JSON mapping) and draws the answers.
// Read-only; everything it loads comes from the server that serves it.
"use strict";

const $ = (id) => document.getElementById(id);
const filters = [];  // {key, mode: "anyOf" | "noneOf" | "gt" | "gte" | "lt" | "lte", value}
const STRING_MODES = [["anyOf", "is"], ["noneOf", "is not"]];
const NUMBER_MODES = [["gt", ">"], ["gte", "≥"], ["lt", "<"], ["lte", "≤"]];
const MODE_NAMES = Object.fromEntries([...STRING_MODES, ...NUMBER_MODES]);
const NUMBER_MODES_BY_NAME = Object.fromEntries(NUMBER_MODES);
let photo = null;     // {base64, url} of a dropped or chosen photo

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  for (const child of children) node.append(child);
  return node;
}

function imageUrl(imageId) {
  return "/v1/images/" + encodeURIComponent(imageId);
}

function productImages(productId) {
  // A product's image ids, main first (the server lists at most 100 and says how many there are).
  return call(`/v1/products/${encodeURIComponent(productId)}/images`);
}

async function call(path, body) {
  const response = await fetch(path, body === undefined ? {} : {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
  const answer = await response.json();
  if (!response.ok) throw new Error(`${answer.code || response.status}: ${answer.message || response.statusText}`);
  return answer;
}

function setStatus(text, state) {
  const status = $("status");
  status.textContent = text;
  status.dataset.state = state;
  status.className = state === "error" ? "error" : "";
}

async function loadInfo() {
  try {
    const info = await call("/v1/info");
    $("info").textContent = `version ${info.version} · ${info.productCount || 0} products, ${info.imageCount || 0} ` +
      `images · ${info.backbone} + ${info.head}, ${info.dimension}-d · availability version ` +
      `${info.availabilityVersion || 0}, ${info.hiddenProductCount || 0} hidden · delta ${info.deltaSequence || 0}, ` +
      `${info.deltaProductCount || 0} products added since the build · server ${info.serverVersion}`;
    const {attributes, numbers = {}} = await call("/v1/attributes");
    const keys = $("filter-key");
    keys.replaceChildren(...[...Object.keys(attributes), ...Object.keys(numbers)].sort().map(
      (key) => element("option", {value: key}, key)));
    // A string key offers its values; a number key a range's operators and a number within its bounds.
    const fillValues = () => {
      const number = numbers[keys.value];
      $("filter-mode").replaceChildren(...(number ? NUMBER_MODES : STRING_MODES).map(
        ([mode, name]) => element("option", {value: mode}, name)));
      $("filter-value").hidden = Boolean(number);
      $("filter-number").hidden = !number;
      if (number) $("filter-number").placeholder = `${number.min} to ${number.max}`;
      $("filter-value").replaceChildren(...(attributes[keys.value] || []).map(
        (entry) => element("option", {value: entry.value}, `${entry.value} (${entry.products})`)));
    };
    keys.addEventListener("change", fillValues);
    fillValues();
  } catch (error) {
    $("info").textContent = "the server does not answer: " + error.message;
  }
}

function drawFilters() {
  $("filters").replaceChildren(...filters.map((filter, position) => {
    const remove = element("button", {type: "button", title: "remove"}, "×");
    remove.addEventListener("click", () => { filters.splice(position, 1); drawFilters(); });
    return element("li", {}, `${filter.key} ${MODE_NAMES[filter.mode]} ${filter.value}`, remove);
  }));
}

function options() {
  const request = {k: Number($("k").value) || 10, withAttributes: true};
  const clauses = {};
  const ranges = [];
  for (const {key, mode, value} of filters) {
    if (mode in NUMBER_MODES_BY_NAME) {
      ranges.push({key, range: {[mode]: value}});
      continue;
    }
    const clause = clauses[key + " " + mode] ||= {key, [mode]: []};
    clause[mode].push(value);
  }
  if (filters.length) request.filter = {clauses: [...Object.values(clauses), ...ranges]};
  return request;
}

function queryLink(attributes, ...children) {
  // A link that makes its product or image the query; the one already in the address runs it again (no hashchange).
  const link = element("a", attributes, ...children);
  link.addEventListener("click", (event) => {
    if (new URL(link.href).hash === location.hash) { event.preventDefault(); fromHash(); }
  });
  return link;
}

async function showOthers(button, box, productId, matchedImageId) {
  button.disabled = true;
  try {
    const answer = await productImages(productId);
    const images = answer.images || [];
    box.replaceChildren(...images.map((image) => queryLink(
      {href: "#image=" + encodeURIComponent(image.imageId), title: `${image.imageId} (${image.role})`},
      element("img", {src: imageUrl(image.imageId), alt: image.imageId,
                      class: image.imageId === matchedImageId ? "matched-image" : ""}))));
    const more = answer.imageCount - images.length;
    if (more > 0) box.append(element("span", {}, `and ${more} more`));
    button.textContent = `${answer.imageCount} image${answer.imageCount === 1 ? "" : "s"}`;
  } catch (error) {
    box.replaceChildren(element("span", {class: "error"}, error.message));
    button.disabled = false;
  }
}

function tile(match) {
  const imageId = match.imageId || match.itemId;
  const productId = match.productId || "";
  const href = productId ? "#product=" + encodeURIComponent(productId) : "#image=" + encodeURIComponent(imageId);
  const attributes = element("dl");
  for (const [key, value] of Object.entries(match.attributes || {}).sort()) {
    attributes.append(element("dt", {}, key), element("dd", {}, value));
  }
  const box = element("div", {class: "tile", "data-product-id": productId, "data-image-id": imageId},
    queryLink({class: "tile-link", href},
              element("img", {class: "tile-image", src: imageUrl(imageId), alt: imageId, loading: "eager"}),
              element("div", {class: "score"}, `score ${(match.score || 0).toFixed(3)}`),
              element("div", {class: "product"}, productId || imageId),
              element("div", {class: "matched"}, `image ${imageId}`), attributes));
  if (productId) {
    const others = element("div", {class: "others"});
    const button = element("button", {type: "button", class: "other-images"}, "all its images");
    button.addEventListener("click", () => showOthers(button, others, productId, imageId));
    box.append(button, others);
  }
  return box;
}

function drawQuery(parts) {
  $("query-view").replaceChildren(element("strong", {}, "query:"), ...parts);
}

function productPicture(productId) {
  // The product's main image, once the server names it; nothing when it cannot (the query's own answer says why).
  const picture = element("img", {alt: productId});
  picture.hidden = true;
  productImages(productId).then((answer) => {
    const main = (answer.images || [])[0];
    if (main) Object.assign(picture, {src: imageUrl(main.imageId), alt: main.imageId, hidden: false});
  }).catch(() => {});
  return picture;
}

async function run(path, request, queryParts) {
  drawQuery(queryParts);
  setStatus("asking…", "busy");
  $("results").replaceChildren();
  const started = performance.now();
  try {
    const answer = await call(path, request);
    const matches = answer.matches || [];
    $("results").replaceChildren(...matches.map(tile));
    const missing = [...(answer.missingProductIds || []), ...(answer.missingImageIds || [])];
    setStatus(`${matches.length} products in ${Math.round(performance.now() - started)} ms · version ` +
              `${answer.indexVersion} · availability version ${answer.availabilityVersion || 0}` +
              ` · delta ${answer.deltaSequence || 0}` +
              (answer.plan ? ` · plan ${answer.plan}` : "") +
              (missing.length ? ` · not in the version: ${missing.join(", ")}` : ""), "done");
  } catch (error) {
    setStatus(error.message, "error");
  }
}

function findSimilar() {
  const value = $("query").value.trim();
  if (!value && !photo) { setStatus("type a product id or an image id, or drop a photo", "error"); return; }
  const request = options();
  if (value) {
    request[$("kind").value] = value;
    const label = `${$("kind").value === "productId" ? "product" : "image"} ${value}`;
    const parts = [label];
    parts.unshift($("kind").value === "imageId" ? element("img", {src: imageUrl(value), alt: value})
                                                : productPicture(value));
    run("/v1/similar", request, parts);
  } else {
    request.image = photo.base64;
    run("/v1/similar", request, [element("img", {src: photo.url, alt: "your photo"}), "your photo"]);
  }
}

function ids(text) {
  return text.split(/[\s,]+/).filter(Boolean).map((productId) => ({productId}));
}

function recommend() {
  const positive = ids($("positive").value), negative = ids($("negative").value);
  if (!positive.length && !negative.length) { setStatus("name at least one product to start from", "error"); return; }
  const request = {...options(), positive, negative, strategy: $("strategy").value, ignoreMissing: true};
  run("/v1/recommend", request, [`more like ${positive.map((e) => e.productId).join(", ") || "—"}; ` +
                                 `less like ${negative.map((e) => e.productId).join(", ") || "—"}`]);
}

function usePhoto(file) {
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => {
    photo = {base64: reader.result.slice(reader.result.indexOf(",") + 1), url: URL.createObjectURL(file)};
    $("query").value = "";
    findSimilar();
  };
  reader.readAsDataURL(file);
}

function fromHash() {
  const params = new URLSearchParams(location.hash.slice(1));
  for (const [kind, name] of [["productId", "product"], ["imageId", "image"]]) {
    if (params.get(name)) {
      $("kind").value = kind;
      $("query").value = params.get(name);
      photo = null;
      findSimilar();
      window.scrollTo(0, 0);
      return;
    }
  }
}

$("query-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const value = $("query").value.trim();
  const wanted = value ? `#${$("kind").value === "productId" ? "product" : "image"}=${encodeURIComponent(value)}` : "";
  if (wanted && location.hash !== wanted) location.hash = wanted;  // the hashchange runs it, and Back works
  else findSimilar();
});
$("query").addEventListener("input", () => { photo = null; });
$("recommend").addEventListener("click", recommend);
$("add-filter").addEventListener("click", () => {
  const mode = $("filter-mode").value;
  const number = mode in NUMBER_MODES_BY_NAME;
  const value = number ? $("filter-number").value : $("filter-value").value;
  if (!$("filter-key").value || value === "" || (number && !Number.isFinite(Number(value)))) return;
  filters.push({key: $("filter-key").value, mode, value: number ? Number(value) : value});
  drawFilters();
});
$("photo").addEventListener("change", (event) => usePhoto(event.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  usePhoto(event.dataTransfer.files[0]);
});
window.addEventListener("hashchange", fromHash);
loadInfo().then(fromHash);
