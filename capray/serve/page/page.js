// capray's page: upload one person's photos, follow the job, show and download the protected photos.
// Vanilla ES2020, no build step. Runs under a CSP without inline script: everything is wired up here.
"use strict";

(() => {
  const KEY_STORAGE = "capray.apiKey"; // sessionStorage only: the key leaves with the tab
  const POLL_MIN_S = 0.5;
  const POLL_MAX_S = 10;
  const POLL_LIMIT_S = 3 * 3600; // give up following a job after this long (the job goes on on the server)
  const POLL_MAX_TRIES = 5000;
  const NETWORK_RETRIES = 3; // consecutive failed polls before saying the network is down
  const PART_OVERHEAD = 512; // bytes a multipart part adds beyond its file (headers, boundary): for the pre-check

  const $ = (id) => document.getElementById(id);
  const info = JSON.parse($("capray-info").textContent);

  // Everything a run leaves behind, so "Start over" and "Delete" can undo it.
  const state = {
    files: [],
    jobId: null,
    result: null,
    xhr: null,
    pollTimer: null,
    runId: 0, // bumped by Start over: a late answer of an abandoned run is ignored
    queueUrls: [],
    resultUrls: [],
  };

  // -- URLs and requests ---------------------------------------------------------------------------------

  // The API sits beside the page: relative URLs resolved against the page's URL made to end in "/", so the
  // page works under any route prefix ("/capray" and "/capray/" both give "/capray/v1/...").
  function apiBase() {
    const url = new URL(window.location.href);
    url.search = "";
    url.hash = "";
    if (!url.pathname.endsWith("/")) url.pathname += "/";
    return url;
  }

  function apiUrl(path) {
    return new URL(path, apiBase()).href;
  }

  function apiKey() {
    return $("api-key").value.trim();
  }

  function authHeaders() {
    return { Authorization: `Bearer ${apiKey()}` };
  }

  // Retry-After is delta-seconds or an HTTP date (RFC 9110); null when absent or unreadable.
  function retryAfterSeconds(value) {
    if (value == null || value === "") return null;
    if (/^\d+$/.test(value.trim())) return Number(value.trim());
    const when = Date.parse(value);
    return Number.isNaN(when) ? null : Math.max(0, Math.round((when - Date.now()) / 1000));
  }

  // -- formatting ----------------------------------------------------------------------------------------

  // Decimal units: the server's limits are set in them (20_000_000 bytes reads "20 MB").
  function formatBytes(n) {
    const units = [["GB", 1e9], ["MB", 1e6], ["kB", 1e3]];
    for (const [unit, scale] of units) {
      if (n >= scale) return `${Number((n / scale).toPrecision(3))} ${unit}`;
    }
    return `${n} bytes`;
  }

  function plural(n, one, many) {
    return `${n} ${n === 1 ? one : many}`;
  }

  const FORMAT_NAMES = { png: "PNG", webp: "WebP" };

  function formatName(format) {
    return FORMAT_NAMES[format] || String(format).toUpperCase();
  }

  function inWords(names) {
    return names.length > 1 ? `${names.slice(0, -1).join(", ")} or ${names[names.length - 1]}` : names.join("");
  }

  function stem(name) {
    const dot = name.lastIndexOf(".");
    return dot > 0 ? name.slice(0, dot) : name;
  }

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else node.setAttribute(k, v);
    }
    for (const child of children) node.append(child);
    return node;
  }

  // -- messages --------------------------------------------------------------------------------------------

  function setStatus(text, ok = false) {
    const status = $("status");
    status.textContent = text;
    status.classList.toggle("ok", ok);
  }

  function clearError() {
    const box = $("error");
    box.replaceChildren();
    box.hidden = true;
  }

  function showError(sentence, detail) {
    const box = $("error");
    box.replaceChildren(el("p", { class: "sentence", text: sentence }));
    if (detail) box.append(el("p", { class: "detail", text: detail }));
    box.hidden = false;
    setStatus("");
  }

  function retryText(seconds) {
    if (seconds == null) return "Try again in a little while.";
    if (seconds < 90) return `Try again in ${plural(seconds, "second", "seconds")}.`;
    return `Try again in about ${plural(Math.round(seconds / 60), "minute", "minutes")}.`;
  }

  function photoName(problem) {
    if (problem.name) return `“${problem.name}”`;
    if (Number.isInteger(problem.photo) && state.files[problem.photo]) return `“${state.files[problem.photo].name}”`;
    return "A photo";
  }

  // One friendly sentence per kind of refusal (the problem's slug); the server's own words follow it.
  const REFUSALS = {
    "unauthorized": () => "An API key is needed: paste yours in the API key field.",
    "invalid-key": () => "This API key was not accepted. Check that you pasted all of it, or ask for a new one.",
    "forbidden": () => "This API key is not allowed to do this.",
    "keys-unavailable": (p, s) => `The server cannot check API keys at the moment. ${retryText(s)}`,
    "server-busy": (p, s) => `The server is busy. ${retryText(s)}`,
    "too-many-jobs": (p, s) => `This API key already has as many jobs in progress as it may. ${retryText(s)}`,
    "rate-limited": (p, s) => `This API key has sent too much in the last minute. ${retryText(s)}`,
    "body-too-large": () => `The photos are too large together: at most ${formatBytes(info.max_request_bytes)} in one go.`,
    "body-too-slow": () => "The upload was too slow and the server stopped it. Try fewer photos at a time.",
    "too-many-photos": () => `Too many photos: at most ${info.max_photos} in one go.`,
    "photo-too-large": (p) => `${photoName(p)} is too large: each photo may be at most ${formatBytes(info.max_photo_bytes)}.`,
    "too-many-pixels": () => "The photos have too many pixels together. Send fewer photos, or smaller ones.",
    "unsupported-format": (p) => `${photoName(p)} is in a format this server does not take. Use ${inWords(info.formats || [])}.`,
    "unsupported-media-type": () => "The server did not understand the upload.",
    "invalid-photo": (p) => `${photoName(p)} cannot be used: it does not open as a photo, or it is smaller than ` +
      `${info.min_image_side} px on a side.`,
    "invalid-input": () => "These photos cannot be protected.",
    "no-photos": () => "Choose at least one photo.",
    "invalid-config": () => "The chosen settings are not valid.",
    "config-not-settable": () => "One of the chosen settings is fixed by the server.",
    "over-server-limits": () => "The chosen settings ask for more than this server allows.",
    "not-found": () => "This job is not on the server (any more): it was deleted, or it expired.",
    "not-finished": () => "This job has no result yet.",
    "timed-out": () => "Protecting these photos took too long and the server stopped.",
    "internal": () => "The server ran into an internal error.",
  };

  function slugOf(problem) {
    const type = typeof problem.type === "string" ? problem.type : "";
    return type.startsWith("urn:capray:problem:") ? type.slice("urn:capray:problem:".length) : "";
  }

  function detailText(problem) {
    const d = problem.detail;
    if (d == null) return "";
    if (typeof d === "string") return d;
    return typeof d.error === "string" ? d.error : JSON.stringify(d);
  }

  // A refused request, as a sentence and the server's own words: `title: detail`.
  function describeRefusal(status, problem, retryAfter) {
    const said = [problem.title, detailText(problem)].filter(Boolean).join(": ");
    const friendly = REFUSALS[slugOf(problem)];
    if (friendly) return { sentence: friendly(problem, retryAfter), detail: said };
    if (said) return { sentence: said, detail: `HTTP ${status}` };
    return { sentence: `The server refused the request (HTTP ${status}).`, detail: "" };
  }

  function parseJson(text) {
    try {
      return JSON.parse(text);
    } catch (e) {
      return null;
    }
  }

  function showRefusal(status, bodyText, retryAfterHeader) {
    const problem = parseJson(bodyText);
    const { sentence, detail } = describeRefusal(status, problem && typeof problem === "object" ? problem : {},
      retryAfterSeconds(retryAfterHeader));
    showError(sentence, detail);
  }

  function showNetworkError(what) {
    showError(`${what} failed: the server could not be reached. Check your connection and try again.`, "");
  }

  // -- choosing photos -----------------------------------------------------------------------------------

  function revokeAll(urls) {
    for (const url of urls.splice(0)) URL.revokeObjectURL(url);
  }

  function setFiles(files) {
    state.files = Array.from(files);
    renderQueue();
    clearError();
    if (state.files.length) {
      const total = state.files.reduce((sum, f) => sum + f.size, 0);
      setStatus(`${plural(state.files.length, "photo", "photos")} chosen (${formatBytes(total)}).`);
    } else {
      setStatus("");
    }
  }

  // Each chosen photo gets a row with a thumbnail and its own upload bar.
  function renderQueue() {
    revokeAll(state.queueUrls);
    const rows = state.files.map((file, i) => {
      const url = URL.createObjectURL(file);
      state.queueUrls.push(url);
      const bar = el("progress", { max: "1", value: "0", "aria-label": `Upload of ${file.name}` });
      return el("li", { class: "queued", "data-index": String(i) },
        el("img", { src: url, alt: `Chosen photo ${file.name}` }),
        el("span", { class: "name", text: file.name },
          el("span", { class: "size", text: ` — ${formatBytes(file.size)}` })),
        bar);
    });
    $("queue").replaceChildren(...rows);
  }

  function uploadBars() {
    return Array.from($("queue").querySelectorAll("progress"));
  }

  // xhr.upload.onprogress reports bytes of the whole multipart body; the photos lie in it one after the
  // other in upload order, so each photo's bar shows how much of its own byte range has been sent.
  function showUploadProgress(loaded, total) {
    const sizes = state.files.map((f) => f.size);
    const photoBytes = sizes.reduce((a, b) => a + b, 0);
    const sent = total > 0 ? (loaded / total) * photoBytes : 0;
    let start = 0;
    uploadBars().forEach((bar, i) => {
      const size = sizes[i] || 1;
      bar.value = Math.min(1, Math.max(0, (sent - start) / size));
      start += sizes[i] || 0;
    });
  }

  // Refusals the page can tell before sending anything: they would only waste the upload.
  function precheck(files) {
    if (!apiKey()) return "Paste your API key first.";
    if (!files.length) return "Choose at least one photo of the person.";
    if (files.length > info.max_photos) {
      return `Too many photos: ${files.length} chosen, this server takes at most ${info.max_photos} in one go. ` +
        "Nothing was sent.";
    }
    const big = files.find((f) => f.size > info.max_photo_bytes);
    if (big) {
      return `“${big.name}” is too large (${formatBytes(big.size)}): each photo may be at most ` +
        `${formatBytes(info.max_photo_bytes)}. Nothing was sent.`;
    }
    const total = files.reduce((sum, f) => sum + f.size + PART_OVERHEAD, PART_OVERHEAD);
    if (total > info.max_request_bytes) {
      return `The photos are too large together (${formatBytes(total)}): at most ` +
        `${formatBytes(info.max_request_bytes)} in one go. Nothing was sent.`;
    }
    return null;
  }

  // -- protecting ----------------------------------------------------------------------------------------

  function requestOptions() {
    const options = { identity: $("identity").value.trim() || "user" };
    const format = $("format").value;
    if (format) options.config = { output: { format } };
    return options;
  }

  function setBusy(busy) {
    $("protect").disabled = busy;
    $("photos").disabled = busy;
    $("drop-zone").setAttribute("aria-disabled", String(busy));
  }

  // One multipart POST (XMLHttpRequest, not fetch: only it reports upload progress).
  function upload(files, options, runId) {
    const form = new FormData();
    for (const file of files) form.append("photo", file, file.name);
    form.append("options", JSON.stringify(options));
    const xhr = new XMLHttpRequest();
    state.xhr = xhr;
    xhr.open("POST", apiUrl("v1/protect"));
    xhr.setRequestHeader("Authorization", authHeaders().Authorization);
    xhr.upload.onprogress = (e) => {
      if (runId === state.runId && e.lengthComputable) showUploadProgress(e.loaded, e.total);
    };
    xhr.upload.onload = () => {
      if (runId !== state.runId) return;
      showUploadProgress(1, 1);
      setStatus("Uploaded. Waiting for the server to take the photos…");
    };
    xhr.onload = () => {
      if (runId !== state.runId) return;
      state.xhr = null;
      if (xhr.status === 202) {
        const job = parseJson(xhr.responseText) || {};
        startFollowing(job.job_id, retryAfterSeconds(xhr.getResponseHeader("Retry-After")), runId);
      } else {
        setBusy(false);
        showRefusal(xhr.status, xhr.responseText, xhr.getResponseHeader("Retry-After"));
      }
    };
    xhr.onerror = () => {
      if (runId !== state.runId) return;
      state.xhr = null;
      setBusy(false);
      showNetworkError("The upload");
    };
    xhr.send(form);
  }

  function onSubmit(event) {
    event.preventDefault();
    clearError();
    const problem = precheck(state.files);
    if (problem) {
      showError(problem, "");
      return;
    }
    clearResults();
    state.runId += 1;
    setBusy(true);
    renderQueue();
    setStatus(`Uploading ${plural(state.files.length, "photo", "photos")}…`);
    upload(state.files, requestOptions(), state.runId);
  }

  // -- following the job -----------------------------------------------------------------------------------

  function startFollowing(jobId, retryAfter, runId) {
    if (!jobId) {
      setBusy(false);
      showError("The server accepted the photos but named no job.", "");
      return;
    }
    state.jobId = jobId;
    $("progress").hidden = false;
    showSteps({ steps_done: 0, steps_total: 0 });
    setStatus("Protecting the photos… this can take a while.");
    const deadline = Date.now() + POLL_LIMIT_S * 1000;
    schedulePoll(jobId, retryAfter, { runId, deadline, tries: 0, failures: 0 });
  }

  // The server says how long to wait (Retry-After); clamp it so a missing or odd value neither hammers
  // the server nor leaves the page asleep.
  function schedulePoll(jobId, seconds, loop) {
    const wait = Math.min(POLL_MAX_S, Math.max(POLL_MIN_S, seconds == null ? 1 : seconds));
    state.pollTimer = window.setTimeout(() => poll(jobId, loop), wait * 1000);
  }

  async function poll(jobId, loop) {
    if (loop.runId !== state.runId) return;
    loop.tries += 1;
    if (loop.tries > POLL_MAX_TRIES || Date.now() > loop.deadline) {
      setBusy(false);
      showError("The page stopped waiting for this job. It may still finish on the server; reload to start over.", "");
      return;
    }
    let resp;
    try {
      resp = await fetch(apiUrl(`v1/jobs/${encodeURIComponent(jobId)}`), { headers: authHeaders(), cache: "no-store" });
    } catch (e) {
      if (loop.runId !== state.runId) return;
      loop.failures += 1;
      if (loop.failures >= NETWORK_RETRIES) {
        setBusy(false);
        showNetworkError("Checking on the job");
        return;
      }
      schedulePoll(jobId, 2 * loop.failures, loop);
      return;
    }
    if (loop.runId !== state.runId) return;
    loop.failures = 0;
    const text = await resp.text();
    if (!resp.ok) {
      setBusy(false);
      showRefusal(resp.status, text, resp.headers.get("Retry-After"));
      return;
    }
    const job = parseJson(text) || {};
    if (job.progress) showSteps(job.progress);
    if (job.status === "pending") {
      schedulePoll(jobId, retryAfterSeconds(resp.headers.get("Retry-After")), loop);
    } else if (job.status === "ok") {
      await showResults(job, loop.runId);
    } else {
      setBusy(false);
      $("progress").hidden = true;
      showError("The server could not protect these photos.", job.error ? `Error: ${job.error}` : "");
    }
  }

  function showSteps(progress) {
    const done = Number(progress.steps_done) || 0;
    const total = Number(progress.steps_total) || 0;
    const bar = $("job-progress");
    if (total > 0) {
      bar.max = total;
      bar.value = Math.min(done, total);
      $("job-steps").textContent = `Step ${done} of ${total}`;
    } else {
      bar.removeAttribute("value"); // indeterminate until the server knows its step count
      $("job-steps").textContent = "Waiting for the protector to start…";
    }
  }

  // -- results ---------------------------------------------------------------------------------------------

  // <img> cannot send the Authorization header, so each protected photo is fetched and shown as a blob URL
  // (which also serves its download link).
  async function fetchBlob(path) {
    const resp = await fetch(apiUrl(path), { headers: authHeaders(), cache: "no-store" });
    if (!resp.ok) {
      const err = new Error(`HTTP ${resp.status}`);
      err.response = { status: resp.status, text: await resp.text(), retryAfter: resp.headers.get("Retry-After") };
      throw err;
    }
    return resp.blob();
  }

  function reportFetchError(err, what) {
    if (err.response) showRefusal(err.response.status, err.response.text, err.response.retryAfter);
    else showNetworkError(what);
  }

  function metric(label, value) {
    return el("div", {}, el("dt", { text: label }), el("dd", { text: value }));
  }

  function fixed(value, digits) {
    return typeof value === "number" && Number.isFinite(value) ? value.toFixed(digits) : "—";
  }

  // A pixel level out of 255: whole numbers as they are, a budget such as 0.05 × 127.5 as 6.38.
  function level(value) {
    if (typeof value !== "number" || !Number.isFinite(value)) return "—";
    return Number.isInteger(value) ? String(value) : String(Number(value.toFixed(2)));
  }

  function resultCard(photo, i, original, protectedUrl, eps) {
    const format = photo.format || "png";
    const name = photo.name || (original ? original.name : `photo-${i}`);
    const originalUrl = original ? URL.createObjectURL(original) : "";
    if (originalUrl) state.resultUrls.push(originalUrl);
    const linf = eps != null ? `${level(photo.linf_255)} of ${level(eps)} (out of 255)` : `${level(photo.linf_255)} (out of 255)`;
    const download = el("a", { class: "button download", href: protectedUrl,
      download: `${stem(name)}-protected.${format}`, text: `Download ${formatName(format)}` });
    download.setAttribute("aria-label", `Download the protected ${name}`);
    const notes = el("ul", { class: "notes" }, ...(photo.notes || []).map((n) => el("li", { text: n })));
    return el("article", { class: "result", "data-index": String(i), "aria-label": name },
      el("h3", { text: name }),
      el("div", { class: "pair" },
        el("figure", {}, originalUrl ? el("img", { src: originalUrl, alt: `Original: ${name}` }) : "",
          el("figcaption", { text: "Original" })),
        el("figure", {}, el("img", { src: protectedUrl, alt: `Protected: ${name}` }),
          el("figcaption", { text: `Protected (${formatName(format)}, ${photo.width}×${photo.height})` }))),
      el("dl", { class: "metrics" },
        metric("L∞ change", linf), metric("PSNR", photo.psnr == null ? "∞ (unchanged)" : `${fixed(photo.psnr, 1)} dB`), metric("SSIM", fixed(photo.ssim, 4))),
      notes, download);
  }

  async function showResults(job, runId) {
    const result = job.result || {};
    const photos = result.photos || [];
    let urls;
    try {
      const blobs = await Promise.all(photos.map((_, i) => fetchBlob(`v1/jobs/${encodeURIComponent(job.job_id)}/photos/${i}`)));
      urls = blobs.map((b) => URL.createObjectURL(b));
    } catch (err) {
      if (runId === state.runId) {
        setBusy(false);
        reportFetchError(err, "Fetching the protected photos");
      }
      return;
    }
    if (runId !== state.runId) {
      revokeAll(urls);
      return;
    }
    state.resultUrls.push(...urls);
    state.result = result;
    const cards = photos.map((p, i) => resultCard(p, i, state.files[i], urls[i], result.eps_255));
    $("results").replaceChildren(...cards);
    $("result-notes").replaceChildren(...(result.notes || []).map((n) => el("li", { text: n })));
    $("progress").hidden = true;
    $("results-section").dataset.jobId = job.job_id;
    $("results-section").hidden = false;
    setBusy(false);
    setStatus(`Done: ${plural(photos.length, "photo", "photos")} protected. Compare them below and download them.`, true);
  }

  function clearResults() {
    $("results").replaceChildren();
    $("result-notes").replaceChildren();
    $("results-section").hidden = true;
    delete $("results-section").dataset.jobId;
    $("progress").hidden = true;
    revokeAll(state.resultUrls);
    state.result = null;
  }

  // A blob URL with a download attribute saves a file; it is revoked with the results, not at once, since
  // the browser may still be reading it when click() returns.
  function saveBlob(blob, fileName) {
    const url = URL.createObjectURL(blob);
    state.resultUrls.push(url);
    const link = el("a", { href: url, download: fileName, hidden: "" });
    document.body.append(link);
    link.click();
    link.remove();
  }

  async function downloadZip() {
    if (!state.jobId) return;
    const button = $("download-zip");
    button.disabled = true;
    setStatus("Preparing the zip…");
    try {
      const blob = await fetchBlob(`v1/jobs/${encodeURIComponent(state.jobId)}/result.zip`);
      const who = ($("identity").value.trim() || "user").replace(/[^\w.-]+/g, "_");
      saveBlob(blob, `${who}-protected.zip`);
      setStatus("The zip is downloading.", true);
    } catch (err) {
      reportFetchError(err, "Downloading the zip");
    } finally {
      button.disabled = false;
    }
  }

  async function deleteJob() {
    if (!state.jobId) return;
    const button = $("delete-job");
    button.disabled = true;
    clearError();
    let resp;
    try {
      resp = await fetch(apiUrl(`v1/jobs/${encodeURIComponent(state.jobId)}`), { method: "DELETE", headers: authHeaders() });
    } catch (e) {
      button.disabled = false;
      showNetworkError("Deleting the job");
      return;
    }
    button.disabled = false;
    if (resp.status === 204 || resp.status === 404) {
      // 404: already gone (expired, or deleted from another tab) — the photos are not on the server either way
      clearResults();
      state.jobId = null;
      setStatus("The photos were removed from the server: the uploads and the protected copies are deleted.", true);
    } else {
      showRefusal(resp.status, await resp.text(), resp.headers.get("Retry-After"));
    }
  }

  // Back to an empty form; the API key stays (it is this tab's), an upload in flight is abandoned.
  function startOver() {
    state.runId += 1;
    if (state.xhr) state.xhr.abort();
    state.xhr = null;
    window.clearTimeout(state.pollTimer);
    state.jobId = null;
    clearResults();
    clearError();
    $("photos").value = "";
    $("identity").value = "";
    $("format").value = "";
    setFiles([]);
    setBusy(false);
    setStatus("Ready for new photos.");
    $("photos").focus();
  }

  // -- wiring ------------------------------------------------------------------------------------------------

  function wireDropZone() {
    const zone = $("drop-zone");
    const over = (e) => {
      e.preventDefault(); // without it the browser opens a dropped file instead of handing it over
      if (!$("photos").disabled) zone.classList.add("dragging");
    };
    zone.addEventListener("dragenter", over);
    zone.addEventListener("dragover", over);
    zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
    zone.addEventListener("drop", (e) => {
      e.preventDefault();
      zone.classList.remove("dragging");
      if ($("photos").disabled || !e.dataTransfer) return;
      const files = Array.from(e.dataTransfer.files);
      try {
        $("photos").files = e.dataTransfer.files; // keep the input in step with what is shown
      } catch (err) {
        // older browsers cannot assign FileList: the page's own list is what gets sent anyway
      }
      setFiles(files);
    });
    // A drop beside the zone must not navigate away from the page (and lose the job).
    window.addEventListener("dragover", (e) => e.preventDefault());
    window.addEventListener("drop", (e) => e.preventDefault());
  }

  function wireKey() {
    const input = $("api-key");
    try {
      input.value = window.sessionStorage.getItem(KEY_STORAGE) || "";
    } catch (e) {
      // storage off (private mode settings): the key just is not remembered
    }
    input.addEventListener("input", () => {
      try {
        if (input.value) window.sessionStorage.setItem(KEY_STORAGE, input.value);
        else window.sessionStorage.removeItem(KEY_STORAGE);
      } catch (e) {
        // as above
      }
    });
  }

  function init() {
    wireKey();
    wireDropZone();
    $("photos").addEventListener("change", (e) => setFiles(e.target.files));
    $("form").addEventListener("submit", onSubmit);
    $("start-over").addEventListener("click", startOver);
    $("download-zip").addEventListener("click", downloadZip);
    $("delete-job").addEventListener("click", deleteJob);
    document.documentElement.dataset.ready = "true"; // scripts (and tests) can tell the page is wired
  }

  init();
})();
