// deskgen's web page: plain script, no build step, only the public HTTP API.
// Every error the API answers is {"error": {code, message, field?, ...}, request_id}: it is shown next to
// the field it names, or in the banner at the top when it names none.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const KEY_STORE = "deskgen.apiKey"; // sessionStorage: gone when the tab closes
  const USER_STORE = "deskgen.userId"; // localStorage: the A/B arm stays the user's
  const FIELD_ALIASES = { image_b64: "image", serve_multiplexed_model_id: "mix" };

  const state = {
    limits: null,
    adapters: [],
    named: {}, // name -> {id, weights}
    photo: null, // File
    busy: false,
    products: null, // the `located` event's products until `done`
  };

  // -- small helpers ------------------------------------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "text") node.textContent = v;
      else if (k === "class") node.className = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children) if (c !== null && c !== undefined) node.append(c);
    return node;
  }

  function fmt(x, digits) {
    return typeof x === "number" && isFinite(x) ? x.toFixed(digits) : "—";
  }

  function authHeaders(extra) {
    const headers = Object.assign({}, extra || {});
    const key = $("api-key").value.trim();
    if (key) headers["Authorization"] = "Bearer " + key;
    return headers;
  }

  /** An error with the API's JSON error (or a made-up one of the same shape) and the answer's status. */
  class ApiError extends Error {
    constructor(status, error, retryAfter) {
      super(error.message || "request failed");
      this.status = status;
      this.error = error;
      this.retryAfter = retryAfter;
    }
  }

  async function errorFrom(response) {
    const retryAfter = response.headers.get("Retry-After");
    let error = null;
    const text = await response.text().catch(() => "");
    try {
      const body = JSON.parse(text);
      if (body && typeof body.error === "object") error = body.error;
    } catch (_) {
      /* not JSON: described below */
    }
    if (!error) {
      error = { code: "http_" + response.status, message: `HTTP ${response.status} ${response.statusText}: ${text.slice(0, 200) || "(no body)"}` };
    }
    return new ApiError(response.status, error, retryAfter);
  }

  async function api(path, options) {
    let response;
    try {
      response = await fetch(path, Object.assign({}, options, { headers: authHeaders((options || {}).headers) }));
    } catch (exc) {
      throw new ApiError(0, { code: "network", message: `cannot reach deskgen (${exc.message}).` });
    }
    if (!response.ok) throw await errorFrom(response);
    return response;
  }

  async function getJson(path) {
    return (await api(path, { headers: { Accept: "application/json" } })).json();
  }

  // -- errors next to their fields ------------------------------------------------------------------

  function clearErrors() {
    for (const slot of document.querySelectorAll(".field-error")) slot.textContent = "";
    for (const input of document.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
    const banner = $("global-error");
    banner.hidden = true;
    banner.textContent = "";
  }

  function describe(err) {
    if (!(err instanceof ApiError)) return String((err && err.message) || err);
    const e = err.error;
    let text = e.message;
    if (e.code === "not_a_desk_setup" && typeof e.score === "number" && !/score \d/.test(text)) {
      text += ` (desk score ${fmt(e.score, 4)}, threshold ${e.threshold})`;
    }
    if ((err.status === 429 || err.status === 503) && err.retryAfter) {
      text += ` Try again in ${err.retryAfter} s.`;
    }
    return text;
  }

  function showError(err, fallbackField) {
    const e = err instanceof ApiError ? err.error : { message: String(err) };
    let field = e.field || fallbackField || null;
    field = FIELD_ALIASES[field] || field;
    if (field && field.startsWith("products")) field = "products";  // products.2 -> the products field
    const slot = field && document.querySelector(`[data-error-for="${CSS.escape(field)}"]`);
    const text = describe(err);
    const code = e.code ? `[${e.code}] ` : "";
    if (slot && !slot.closest("[hidden]")) {
      slot.textContent = code + text;
      const input = slot.parentElement.querySelector("input, select, textarea");
      if (input) input.setAttribute("aria-invalid", "true");
      slot.scrollIntoView({ block: "center" });
      if (field === "Authorization" || field === "user_id") $("access").open = true;
    } else {
      const banner = $("global-error");
      banner.textContent = code + text + (field ? ` (field: ${field})` : "");
      banner.hidden = false;
    }
  }

  window.addEventListener("error", (event) => showError(new Error(`page error: ${event.message}`)));
  window.addEventListener("unhandledrejection", (event) => showError(event.reason || new Error("page error")));

  // -- the form ------------------------------------------------------------------------------------

  function mode() {
    return $("mode-prompt").checked ? "prompt" : "photo";
  }

  function mixSpecFromSliders() {
    const parts = [];
    for (const input of document.querySelectorAll("#sliders input[type=range]")) {
      const w = Number(input.value);
      if (w > 0) parts.push(`${input.dataset.adapter}:${Number(w.toFixed(2))}`);
    }
    return parts.length ? parts.join("+") : "base";
  }

  /** The mix to send: "" (the A/B split), a named mix, or the sliders' ad-hoc spec. */
  function chosenMix() {
    const value = $("mix").value;
    return value === "__custom" ? mixSpecFromSliders() : value;
  }

  function showMixSpec() {
    const mix = chosenMix();
    $("mix-spec").textContent = mix || "A/B split";
  }

  function setSliders(weights) {
    for (const input of document.querySelectorAll("#sliders input[type=range]")) {
      input.value = String((weights || {})[input.dataset.adapter] || 0);
      input.nextElementSibling.textContent = Number(input.value).toFixed(2);
    }
  }

  /** The options the user set (empty inputs are left out: the server's defaults apply). */
  function options(overrides) {
    const o = {};
    const mix = chosenMix();
    if (mix) o.mix = mix;
    for (const name of ["seed", "steps", "width", "height"]) {
      const raw = $(name).value.trim();
      if (raw !== "") o[name] = /^-?\d+$/.test(raw) ? Number(raw) : raw;
    }
    const concept = $("concept").value;
    if (concept) o.concept = concept;
    const style = $("style").value.trim();
    if (style && mode() === "photo") o.style = style;
    const user = $("user-id").value.trim();
    if (user) o.user_id = user;
    const products = $("products").value.split(",").map((p) => p.trim()).filter((p) => p);
    if (products.length) o.products = mode() === "photo" ? products.join(",") : products;
    return Object.assign(o, overrides || {});
  }

  /** fetch() arguments for one generation: multipart for a photo, JSON for a prompt. */
  function generationRequest(accept, overrides) {
    const o = options(overrides);
    if (mode() === "photo") {
      if (!state.photo) throw new ApiError(400, { code: "invalid_parameter", field: "image", message: "choose a desk photo first (or drop one on the box)." });
      const form = new FormData();
      form.append("image", state.photo, state.photo.name || "desk.jpg");
      for (const [k, v] of Object.entries(o)) form.append(k, String(v));
      return ["/v1/generate", { method: "POST", body: form, headers: { Accept: accept } }];
    }
    let prompt = $("prompt").value.trim();
    const style = $("style").value.trim();
    if (!prompt) throw new ApiError(400, { code: "invalid_parameter", field: "prompt", message: "type a prompt first." });
    if (style) prompt += ", " + style;
    return ["/v1/text2img", { method: "POST", body: JSON.stringify(Object.assign({ prompt }, o)),
                              headers: { Accept: accept, "Content-Type": "application/json" } }];
  }

  function setBusy(busy) {
    state.busy = busy;
    $("generate").disabled = busy;
    $("compare").disabled = busy;
    $("gen-form").setAttribute("aria-busy", busy ? "true" : "false");
  }

  // -- progress --------------------------------------------------------------------------------------

  const progress = {
    seen: [],
    total: 0,
    reset(totalSteps) {
      this.seen = [];
      this.total = totalSteps;
      const bar = $("progress");
      bar.max = 3 + totalSteps + 1; // classified, captioned, started, each step, done
      bar.value = 0;
      $("run").dataset.states = "";
      $("run").dataset.phase = "running";
      $("step-count").textContent = "";
      for (const li of document.querySelectorAll("#stages li")) li.className = "";
    },
    mark(name, detail) {
      const bar = $("progress");
      this.seen.push(detail === undefined ? name : `${name}:${detail}`);
      $("run").dataset.states = this.seen.join(" ");
      const li = document.querySelector(`#stages li[data-stage="${name}"]`);
      if (li) li.className = "reached";
      if (name === "classified") bar.value = Math.max(bar.value, 1);
      if (name === "captioned") bar.value = Math.max(bar.value, 2);
      if (name === "started") bar.value = Math.max(bar.value, 3);
      if (name === "step") {
        const [step, total] = detail.split("/").map(Number);
        if (total && total !== this.total) { this.total = total; bar.max = 3 + total + 1; }
        bar.value = 3 + step;
        $("step-count").textContent = `${step} / ${total}`;
      }
      if (name === "done") { bar.value = bar.max; $("run").dataset.phase = "done"; }
      if (name === "error") $("run").dataset.phase = "error";
    },
  };

  function status(text) {
    $("status").textContent = text;
  }

  // -- answers ----------------------------------------------------------------------------------------

  function showDetails(data) {
    $("details").hidden = false;
    if (typeof data.score === "number" || typeof data.desk_score === "number") {
      const score = typeof data.score === "number" ? data.score : data.desk_score;
      $("gate-score").textContent = fmt(score, 4) + (data.threshold !== undefined ? ` (threshold ${data.threshold})` : "");
    }
    if (data.captions) {
      const list = $("captions");
      list.replaceChildren();
      if (data.captions.unconditional) list.append(el("li", { text: data.captions.unconditional }));
      for (const c of data.captions.conditional || []) {
        list.append(el("li", {}, el("span", { class: "prefix", text: c.prefix + " " }), c.caption));
      }
    }
    if (data.keywords) {
      $("keywords").replaceChildren(...data.keywords.map((k) => el("li", { text: `${k.name} ×${k.count}` })));
    }
    if (data.prompt) $("prompt-used").textContent = data.prompt;
  }

  function pngBlob(b64) {
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    return new Blob([bytes], { type: "image/png" });
  }

  /** Boxes over the image from `products.items[].instances[].box_normalized` (0..1); nothing when absent. */
  function drawProducts(stage, products) {
    const old = stage.querySelector(".boxes");
    if (old) old.remove();
    if (!products || typeof products !== "object") return null;
    const layer = el("div", { class: "boxes", "aria-hidden": "true" });
    let drawn = 0;
    for (const item of products.items || []) {
      if (!item || !item.found) continue;
      for (const inst of item.instances || []) {
        const b = inst && inst.box_normalized;
        if (!Array.isArray(b) || b.length !== 4 || !b.every((v) => typeof v === "number" && isFinite(v))) continue;
        const [x0, y0, x1, y1] = b.map((v) => Math.min(Math.max(v, 0), 1));
        const box = el("div", { class: "box" }, el("span", { text: `${item.product} ${fmt(inst.score, 2)}` }));
        Object.assign(box.style, { left: `${x0 * 100}%`, top: `${y0 * 100}%`, width: `${(x1 - x0) * 100}%`, height: `${(y1 - y0) * 100}%` });
        layer.append(box);
        drawn += 1;
      }
    }
    stage.append(layer);
    stage.dataset.boxes = String(drawn);
    const found = (products.items || []).filter((i) => i && i.found).map((i) => i.product);
    if (products.status && products.status !== "ok") return `products: ${products.status}${products.reason ? " (" + products.reason + ")" : ""}`;
    return found.length ? `products found: ${found.join(", ")}` : "no products found";
  }

  /** A checkbox that shows or hides the image's product boxes (nothing when there are none). */
  function boxesToggle(stage) {
    const layer = stage.querySelector(".boxes");
    if (!layer || !layer.children.length) return null;
    const box = el("input", { type: "checkbox", checked: true, class: "show-boxes" });
    box.addEventListener("change", () => { layer.hidden = !box.checked; });
    return el("label", { class: "toggle" }, box, `show product boxes (${layer.children.length})`);
  }

  async function sendFeedback(imageId, event, note) {
    const body = { image_id: imageId, event };
    const user = $("user-id").value.trim();
    if (user) body.user_id = user;
    try {
      const r = await api("/v1/feedback", { method: "POST", body: JSON.stringify(body),
                                            headers: { "Content-Type": "application/json", Accept: "application/json" } });
      const answer = await r.json();
      note.textContent = `${event}: ${answer.duplicate ? "already recorded" : "recorded"}`;
      note.dataset.recorded = event;
    } catch (err) {
      note.textContent = `${event} not recorded: ${describe(err)}`;
      note.dataset.recorded = "";
    }
  }

  /** A figure with the image, its boxes, mix, seed, timings and the like / dislike / download buttons. */
  function figure(answer, title) {
    const blob = pngBlob(answer.image_b64);
    const url = URL.createObjectURL(blob);
    const img = el("img", { src: url, alt: `generated desk setup, mix ${answer.mix ? answer.mix.id : ""}, seed ${answer.seed}`,
                            class: "generated", width: answer.width, height: answer.height });
    const stage = el("div", { class: "stage" }, img);
    const productsNote = drawProducts(stage, answer.products);
    const mix = answer.mix || {};
    const mixText = (mix.name ? `${mix.name} = ` : "") + (mix.id || "?") + (mix.arm ? ` (A/B arm ${mix.arm})` : mix.source ? ` (${mix.source})` : "");
    const timings = Object.entries(answer.timings || {}).map(([k, v]) => `${k.replace(/_s$/, "")} ${fmt(v, 2)} s`).join(" · ");
    const note = el("p", { class: "feedback-note", role: "status", "aria-live": "polite" });
    const id = answer.request_id;
    const name = `deskgen-${(mix.id || "mix").replace(/[^A-Za-z0-9_.-]+/g, "_")}-${answer.seed}.png`;
    const download = el("a", { href: url, download: name, class: "button", onclick: () => sendFeedback(id, "download", note) }, "Download");
    const caption = el("figcaption", {},
      title ? el("strong", { text: title }) : null,
      el("dl", { class: "facts" },
        el("dt", { text: "mix" }), el("dd", { class: "mix-id", text: mixText }),
        el("dt", { text: "seed" }), el("dd", { class: "seed", text: String(answer.seed) }),
        el("dt", { text: "size" }), el("dd", { text: `${answer.width}×${answer.height}, ${answer.steps} steps` }),
        answer.concept ? el("dt", { text: "concept" }) : null, answer.concept ? el("dd", { text: answer.concept }) : null,
        el("dt", { text: "timings" }), el("dd", { text: timings || "—" }),
        el("dt", { text: "image id" }), el("dd", { class: "image-id", text: id })),
      productsNote ? el("p", { class: "hint products-note", text: productsNote }) : null,
      boxesToggle(stage),
      el("div", { class: "feedback" },
        el("button", { type: "button", class: "like", "aria-label": "like this image", onclick: () => sendFeedback(id, "like", note) }, "Like"),
        el("button", { type: "button", class: "dislike", "aria-label": "dislike this image", onclick: () => sendFeedback(id, "dislike", note) }, "Dislike"),
        download),
      note);
    return el("figure", { class: "result", "data-image-id": id }, stage, caption);
  }

  // -- server-sent events over fetch (a POST: EventSource cannot send a body) --------------------------

  async function* sseEvents(response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (value) buffer += decoder.decode(value, { stream: true });
      if (done) buffer += decoder.decode();
      buffer = buffer.replace(/\r\n?/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        let event = "message";
        const data = [];
        for (const line of block.split("\n")) {
          if (line.startsWith(":")) continue;
          const colon = line.indexOf(":");
          const name = colon < 0 ? line : line.slice(0, colon);
          const val = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
          if (name === "event") event = val;
          else if (name === "data") data.push(val);
        }
        if (data.length) yield { event, data: JSON.parse(data.join("\n")) };
      }
      if (done) return;
    }
  }

  async function generate() {
    clearErrors();
    const [path, init] = generationRequest("text/event-stream");
    const steps = Number($("steps").value) || (state.limits ? state.limits.defaults.steps : 1);
    progress.reset(steps);
    $("details").hidden = true;
    $("result").replaceChildren();
    state.products = null;
    $("run").scrollIntoView({ block: "start" });
    status(mode() === "photo" ? "Uploading the photo…" : "Sending the prompt…");
    let response;
    try {
      response = await api(path, init);
    } catch (err) {
      progress.mark("error");
      status("Refused: " + describe(err));
      throw err;
    }
    let shown = null;
    for await (const { event, data } of sseEvents(response)) {
      if (event === "classified") {
        progress.mark("classified");
        showDetails(data);
        status(`Classified: desk score ${fmt(data.score, 4)}.`);
      } else if (event === "captioned") {
        progress.mark("captioned");
        showDetails(data);
        status("Captioned; prompt built.");
      } else if (event === "started") {
        progress.mark("started");
        status(`Generating with ${data.mix_id}…`);
      } else if (event === "step") {
        progress.mark("step", `${data.step}/${data.total}`);
        status(`Step ${data.step} of ${data.total}…`);
      } else if (event === "located") {
        state.products = data && data.products !== undefined ? data.products : data;
      } else if (event === "done") {
        progress.mark("done");
        showDetails(data);
        if (data.products === undefined && state.products) data.products = state.products;
        shown = figure(data, null);
        $("result").replaceChildren(shown);
        status(`Done in ${fmt((data.timings || {}).total_s, 2)} s: mix ${data.mix ? data.mix.id : "?"}, seed ${data.seed}.`);
      } else if (event === "error") {
        progress.mark("error");
        const err = new ApiError(data.status || 500, data.error || { message: "generation failed" });
        status("Failed: " + describe(err));
        throw err;
      }
    }
    if (!shown) {
      progress.mark("error");
      throw new ApiError(0, { code: "stream_ended", message: "the event stream ended before the image was done." });
    }
  }

  async function compare() {
    clearErrors();
    const mixes = [...document.querySelectorAll("#compare-mixes input:checked")].map((i) => i.value);
    if (mixes.length < 2) throw new ApiError(400, { code: "invalid_parameter", field: "compare", message: "tick two or more mixes to compare." });
    if ($("seed").value.trim() === "") {
      const max = state.limits ? Math.min(state.limits.max_seed, 2 ** 31 - 1) : 2 ** 31 - 1;
      $("seed").value = String(Math.floor(Math.random() * max));
    }
    generationRequest("application/json"); // refuses early without a photo or prompt
    $("compare-section").hidden = false;
    $("compare-section").scrollIntoView({ block: "start" });
    const grid = $("compare-grid");
    grid.replaceChildren();
    let i = 0;
    for (const mix of mixes) {
      i += 1;
      $("compare-status").textContent = `Generating ${i} of ${mixes.length}: ${mix}…`;
      const [path, init] = generationRequest("application/json", { mix });
      try {
        const answer = await (await api(path, init)).json();
        grid.append(figure(answer, mix));
      } catch (err) {
        grid.append(el("figure", { class: "result failed" }, el("figcaption", {}, el("strong", { text: mix }),
          el("p", { class: "field-error", text: describe(err) }))));
        if (err instanceof ApiError && err.error.field && err.error.field !== "mix") showError(err);
      }
    }
    $("compare-status").textContent = `Compared ${mixes.length} mixes with seed ${$("seed").value}.`;
  }

  async function run(action) {
    if (state.busy) return;
    setBusy(true);
    try {
      await action();
    } catch (err) {
      showError(err);
    } finally {
      setBusy(false);
    }
  }

  // -- set-up: the live limits, mixes and concepts -----------------------------------------------------

  function applyLimits(limits) {
    state.limits = limits;
    const d = limits.defaults || {};
    $("seed").max = String(limits.max_seed);
    $("steps").max = String(limits.max_steps);
    $("steps").placeholder = String(d.steps);
    for (const side of ["width", "height"]) {
      $(side).min = String(limits.min_side);
      $(side).max = String(limits.max_side);
      $(side).step = String(limits.side_multiple);
      $(side).placeholder = String(d[side]);
    }
    $("prompt").maxLength = limits.max_prompt_chars;
    $("style").maxLength = limits.max_style_chars;
    $("user-id").maxLength = limits.max_user_id_chars;
    $("limits-note").textContent = `Limits: steps 1–${limits.max_steps}, sides ${limits.min_side}–${limits.max_side} in multiples of ` +
      `${limits.side_multiple}, uploads up to ${Math.round(limits.max_upload_bytes / 1048576)} MiB. Empty fields take the defaults.`;
  }

  function applyMixes(mixes) {
    state.adapters = mixes.adapters || [];
    state.named = mixes.named_mixes || {};
    const select = $("mix");
    const current = select.value;
    select.replaceChildren(el("option", { value: "" }, "A/B split (the server picks)"));
    for (const [name, m] of Object.entries(state.named)) select.append(el("option", { value: name }, `${name} (${m.id})`));
    select.append(el("option", { value: "__custom" }, "ad-hoc: set each adapter below"));
    select.value = [...select.options].some((o) => o.value === current) ? current : "";
    const sliders = $("sliders");
    sliders.replaceChildren();
    for (const adapter of state.adapters) {
      const id = `w-${adapter.replace(/[^A-Za-z0-9_-]/g, "_")}`;
      const input = el("input", { type: "range", id, min: "0", max: "2", step: "0.05", value: "0", "data-adapter": adapter,
                                  "aria-describedby": `${id}-value` });
      input.addEventListener("input", () => {
        input.nextElementSibling.textContent = Number(input.value).toFixed(2);
        select.value = "__custom";
        showMixSpec();
      });
      sliders.append(el("div", { class: "slider" }, el("label", { for: id, text: adapter }), input,
                        el("output", { id: `${id}-value`, for: id, text: "0.00" })));
    }
    const checks = $("compare-mixes");
    checks.replaceChildren();
    let n = 0;
    for (const name of Object.keys(state.named)) {
      const id = `cmp-${name}`;
      checks.append(el("label", { for: id }, el("input", { type: "checkbox", id, value: name, checked: n < 2 }), " " + name));
      n += 1;
    }
    if (mixes.default_mix && state.named[mixes.default_mix]) setSliders(state.named[mixes.default_mix].weights);
    showMixSpec();
  }

  function applyConcepts(concepts) {
    const select = $("concept");
    const current = select.value;
    select.replaceChildren(el("option", { value: "" }, "none"), el("option", { value: "auto" }, `auto (today: ${concepts.today || "?"})`));
    for (const name of Object.keys(concepts.concepts || {})) select.append(el("option", { value: name }, name));
    select.value = current;
  }

  async function loadExperimentLink() {
    const link = $("report-link");
    const listing = await getJson("/v1/experiments");
    if (listing.current) {
      link.href = `/v1/experiments/${encodeURIComponent(listing.current)}`;
      link.textContent = `A/B report (${listing.current})`;
      link.dataset.experiment = listing.current;
    }
  }

  async function loadMeta() {
    clearErrors();
    const results = await Promise.allSettled([
      getJson("/v1/limits").then(applyLimits),
      getJson("/v1/mixes").then(applyMixes),
      getJson("/v1/concepts").then(applyConcepts),
      loadExperimentLink(),
    ]);
    const failed = results.find((r) => r.status === "rejected");
    if (failed) showError(failed.reason, failed.reason instanceof ApiError && failed.reason.status === 401 ? "Authorization" : null);
  }

  function choosePhoto(file) {
    if (!file) return;
    state.photo = file;
    const preview = $("photo-preview");
    if (preview.src) URL.revokeObjectURL(preview.src);
    preview.src = URL.createObjectURL(file);
    preview.hidden = false;
    $("photo-name").textContent = `${file.name} (${Math.ceil(file.size / 1024)} KiB)`;
    const slot = document.querySelector('[data-error-for="image"]');
    slot.textContent = "";
  }

  function init() {
    // The key lives in this tab's sessionStorage only; the user id (the A/B arm's) in localStorage.
    $("api-key").value = sessionStorage.getItem(KEY_STORE) || "";
    $("api-key").addEventListener("change", () => {
      sessionStorage.setItem(KEY_STORE, $("api-key").value.trim());
      loadMeta();
    });
    let user = localStorage.getItem(USER_STORE);
    if (!user) {
      user = "web-" + Array.from(crypto.getRandomValues(new Uint8Array(6)), (b) => b.toString(16).padStart(2, "0")).join("");
      localStorage.setItem(USER_STORE, user);
    }
    $("user-id").value = user;
    $("user-id").addEventListener("change", () => localStorage.setItem(USER_STORE, $("user-id").value.trim()));

    for (const radio of document.querySelectorAll('input[name="mode"]')) {
      radio.addEventListener("change", () => {
        $("photo-input").hidden = mode() !== "photo";
        $("prompt-input").hidden = mode() !== "prompt";
      });
    }
    $("photo").addEventListener("change", () => choosePhoto($("photo").files[0]));
    const zone = $("drop-zone");
    for (const name of ["dragenter", "dragover"]) {
      zone.addEventListener(name, (e) => { e.preventDefault(); zone.classList.add("over"); });
    }
    for (const name of ["dragleave", "drop"]) zone.addEventListener(name, () => zone.classList.remove("over"));
    zone.addEventListener("drop", (e) => {
      e.preventDefault();
      const file = [...(e.dataTransfer.files || [])].find((f) => f.type.startsWith("image/")) || e.dataTransfer.files[0];
      choosePhoto(file);
    });
    $("mix").addEventListener("change", () => {
      const name = $("mix").value;
      if (state.named[name]) setSliders(state.named[name].weights);
      showMixSpec();
    });
    $("gen-form").addEventListener("submit", (e) => { e.preventDefault(); run(generate); });
    $("compare").addEventListener("click", () => run(compare));
    $("report-link").addEventListener("click", (e) => {
      // With a key, the report page needs it too: fetch it and show it in a new tab.
      if (!$("api-key").value.trim()) return;
      e.preventDefault();
      const tab = window.open("", "_blank");
      api($("report-link").getAttribute("href"), { headers: { Accept: "text/html" } })
        .then((r) => r.text())
        .then((html) => { if (tab) { tab.document.open(); tab.document.write(html); tab.document.close(); } })
        .catch((err) => { if (tab) tab.close(); showError(err); });
    });
    document.body.dataset.ready = "loading";
    loadMeta().finally(() => { document.body.dataset.ready = "true"; });
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
