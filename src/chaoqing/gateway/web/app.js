// chaoqing's web page: choose a photo, POST it to v1/jobs, follow the job's progress (its event
// stream, else GET), fetch the result, compare before and after.
// Plain browser JavaScript, no build step, no external resources.
"use strict";

(() => {
  const API_KEY_STORAGE = "chaoqing.apiKey";
  const ELAPSED_TICK_MS = 100;
  const POLL_INTERVAL_MS = 500; // GET v1/jobs/{id} when the event stream cannot be used
  const LOST_CONTACT_MS = 60000; // a gateway restart takes seconds (its jobs survive it); then give up
  const STAGES = { // the job's status, or its progress.stage while running (docs/jobs.md)
    queued: "Waiting for its turn",
    start: "Starting",
    decode: "Decoding the photo",
    enhance: "Upscaling and enhancing faces",
    upscale: "Upscaling",
    composite: "Putting the faces in",
    encode: "Encoding the result",
  };
  const KEY_STEP_PERCENT = 1; // arrow keys; PageUp/PageDown move 10 (the range input's own behaviour)
  const HINTS = {
    unauthorized: "This gateway needs an API key: enter it under “API key” and try again.",
    image_too_large: "Try a smaller photo or a lower scale.",
    invalid_image: "Is it a JPEG, PNG, WebP, GIF, BMP or TIFF photo that opens elsewhere?",
    unsupported_media_type: "Choose a JPEG, PNG, WebP, GIF, BMP or TIFF photo.",
    model_error: "A model server failed on this photo: try again, or another preset.",
    deadline_exceeded: "It took too long: try a lower scale or the fast preset.",
    overloaded: "The gateway is busy",
    model_unavailable: "A model server is not available",
    request_timeout: "The upload was too slow; check the connection and try again.",
    spool_full: "The gateway holds as many jobs as it may",
    job_lost: "The gateway running it stopped again and again: try a smaller photo or a lower scale.",
  };

  const $ = (id) => document.getElementById(id);
  const elements = {
    form: $("enhance-form"), dropZone: $("drop-zone"), fileInput: $("file-input"),
    chosen: $("chosen"), chosenThumb: $("chosen-thumb"), chosenName: $("chosen-name"), chosenInfo: $("chosen-info"),
    preset: $("preset"), presetDescription: $("preset-description"),
    scale: $("scale"), scaleValue: $("scale-value"), outputSizeHint: $("output-size-hint"),
    faces: $("faces"), format: $("format"),
    apiKeyDetails: $("api-key-details"), apiKey: $("api-key"), forgetKey: $("forget-key"),
    enhanceButton: $("enhance-button"), cancelButton: $("cancel-button"),
    progress: $("progress"), progressBar: $("progress-bar"), progressLabel: $("progress-label"),
    elapsed: $("elapsed"), statusLine: $("status-line"), eta: $("eta"),
    tilesName: $("tiles-name"), tilesText: $("tiles-text"),
    facesMeter: $("faces-meter"), facesBar: $("faces-bar"), facesText: $("faces-text"),
    error: $("error"), errorCode: $("error-code"), errorMessage: $("error-message"), errorHint: $("error-hint"),
    placeholder: $("placeholder"), previewImage: $("preview-image"), placeholderText: $("placeholder-text"),
    viewport: $("viewport"), compare: $("compare"),
    afterImage: $("after-image"), beforeImage: $("before-image"), range: $("compare-range"),
    details: $("details"), facesResult: $("faces-result"), sizeResult: $("size-result"),
    bytesResult: $("bytes-result"), timeResult: $("time-result"), timings: $("timings"),
    requestId: $("request-id"), downloadLink: $("download-link"), againButton: $("again-button"),
    zoomButtons: Array.from(document.querySelectorAll(".zoom-button")),
  };

  const limits = { bytes: Infinity, inputPixels: Infinity, outputPixels: Infinity }; // from openapi.json

  const state = {
    file: null, fileUrl: null, inputSize: null, resultUrl: null, outputSize: null,
    request: null, job: null, startedAt: 0, ticker: null, etaAt: null, etaNote: "", zoom: "fit",
  };

  // -- small helpers ----------------------------------------------------------------------

  function setState(name) {
    document.body.dataset.state = name;
  }

  function announce(text) {
    elements.statusLine.textContent = text;
  }

  function formatBytes(bytes) {
    if (bytes < 1024) return `${bytes} B`;
    if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(0)} KB`;
    return `${(bytes / 1024 / 1024).toFixed(1)} MB`;
  }

  /** 42 s, 3 min 20 s, 1 h 05 min; ``digits`` decimals under a minute. */
  function formatSeconds(seconds, digits = 0) {
    if (seconds < 60) return `${seconds.toFixed(digits)} s`;
    const minutes = Math.floor(seconds / 60);
    if (minutes < 60) return `${minutes} min ${String(Math.floor(seconds % 60)).padStart(2, "0")} s`;
    return `${Math.floor(minutes / 60)} h ${String(minutes % 60).padStart(2, "0")} min`;
  }

  function formatMs(ms) {
    return ms >= 1000 ? `${(ms / 1000).toFixed(2)} s` : `${ms.toFixed(ms < 10 ? 1 : 0)} ms`;
  }

  function outputSizeFor(size, scale) {
    return { width: Math.max(1, Math.round(size.width * scale)), height: Math.max(1, Math.round(size.height * scale)) };
  }

  function replaceUrl(key, blob) {
    if (state[key]) URL.revokeObjectURL(state[key]);
    state[key] = blob ? URL.createObjectURL(blob) : null;
    return state[key];
  }

  /** "decode;dur=1.2, upscale;dur=30" → [{name: "decode", ms: 1.2}, ...] */
  function parseServerTiming(header) {
    if (!header) return [];
    return header.split(",").map((entry) => {
      const [name, ...parameters] = entry.trim().split(";");
      const duration = parameters.map((p) => p.trim()).find((p) => p.startsWith("dur="));
      return { name: name.trim(), ms: duration ? Number(duration.slice(4)) : NaN };
    }).filter((timing) => timing.name && Number.isFinite(timing.ms));
  }

  // -- settings ---------------------------------------------------------------------------

  function updateScaleText() {
    const scale = Number(elements.scale.value);
    elements.scaleValue.textContent = `${scale}×`;
    if (state.inputSize) {
      const size = outputSizeFor(state.inputSize, scale);
      elements.outputSizeHint.textContent =
        `${state.inputSize.width} × ${state.inputSize.height} → ${size.width} × ${size.height} pixels`;
    } else {
      elements.outputSizeHint.textContent = "Output size over input size.";
    }
  }

  const presetDescriptions = {};

  function updatePresetText() {
    elements.presetDescription.textContent = presetDescriptions[elements.preset.value] || "";
  }

  /** Fill presets, defaults and the API-key hint from the gateway's own OpenAPI document. */
  async function loadApiDescription() {
    let document_;
    try {
      const response = await fetch("openapi.json", { cache: "no-cache" });
      if (!response.ok) return;
      document_ = await response.json();
    } catch (error) {
      return; // the static defaults in the page stay
    }
    const operation = document_?.paths?.["/v1/jobs"]?.post || document_?.paths?.["/v1/enhance"]?.post;
    const parameters = operation?.parameters || [];
    const preset = parameters.find((p) => p.name === "preset");
    if (preset?.schema?.enum?.length) {
      for (const part of (preset.description || "").split("; ")) {
        const colon = part.indexOf(":");
        if (colon > 0) presetDescriptions[part.slice(0, colon).trim()] = part.slice(colon + 1).trim();
      }
      elements.preset.replaceChildren(...preset.schema.enum.map((name) => new Option(name, name)));
      elements.preset.value = preset.schema.default || preset.schema.enum[0];
    }
    // "The job's own limits: 134217728 bytes, 25000000 input pixels, 100000000 output pixels, …"
    const limitText = /(\d+) bytes, (\d+) input pixels, (\d+) output pixels/.exec(operation?.description || "");
    if (limitText) [limits.bytes, limits.inputPixels, limits.outputPixels] = limitText.slice(1).map(Number);
    const scale = parameters.find((p) => p.name === "scale");
    if (scale?.schema?.default) elements.scale.value = String(scale.schema.default);
    const needsKey = (operation?.security || document_?.security || []).length > 0;
    if (needsKey && !elements.apiKey.value) elements.apiKeyDetails.open = true;
    updatePresetText();
    updateScaleText();
  }

  function loadApiKey() {
    try {
      elements.apiKey.value = localStorage.getItem(API_KEY_STORAGE) || "";
    } catch (error) { /* storage disabled: the field still works for this page */ }
  }

  function saveApiKey() {
    try {
      const key = elements.apiKey.value.trim();
      if (key) localStorage.setItem(API_KEY_STORAGE, key);
      else localStorage.removeItem(API_KEY_STORAGE);
    } catch (error) { /* storage disabled */ }
  }

  // -- choosing a photo -------------------------------------------------------------------

  function chooseFile(file) {
    if (!file) return;
    state.file = file;
    state.inputSize = null;
    const url = replaceUrl("fileUrl", file);
    elements.chosenThumb.src = url;
    elements.chosenName.textContent = file.name || "pasted image";
    elements.chosenInfo.textContent = formatBytes(file.size);
    elements.chosen.hidden = false;
    elements.previewImage.src = url; // until the result comes, the photo itself
    elements.previewImage.hidden = false;
    elements.placeholderText.hidden = true;
    elements.placeholder.hidden = false;
    elements.viewport.hidden = true;
    elements.details.hidden = true;
    elements.dropZone.querySelector("#drop-text").innerHTML =
      "<strong>Drop another photo</strong> or <span class=\"link-like\">choose a file</span>";
    elements.chosenThumb.hidden = false;
    const probe = new Image();
    probe.onerror = () => { // TIFF, or not a picture: the gateway says which
      if (state.file !== file) return;
      elements.chosenThumb.hidden = true;
      elements.previewImage.hidden = true;
      elements.placeholderText.textContent =
        `This browser cannot show ${file.name || "this file"}; the gateway may still read it.`;
      elements.placeholderText.hidden = false;
      elements.chosenInfo.textContent = `${formatBytes(file.size)} · no preview`;
    };
    probe.onload = () => {
      if (state.file !== file) return;
      state.inputSize = { width: probe.naturalWidth, height: probe.naturalHeight };
      elements.chosenInfo.textContent = `${probe.naturalWidth} × ${probe.naturalHeight} · ${formatBytes(file.size)}`;
      updateScaleText();
    };
    probe.src = url;
    hideError();
    elements.enhanceButton.disabled = false;
    setState("ready");
    updateScaleText();
  }

  function installFileInputs() {
    elements.fileInput.addEventListener("change", () => {
      chooseFile(elements.fileInput.files[0]);
      elements.fileInput.value = ""; // choosing the same file again still counts
    });
    let depth = 0; // dragenter/dragleave fire for every child element
    window.addEventListener("dragenter", (event) => {
      event.preventDefault();
      depth += 1;
      elements.dropZone.classList.add("dragging");
    });
    window.addEventListener("dragleave", () => {
      depth = Math.max(0, depth - 1);
      if (depth === 0) elements.dropZone.classList.remove("dragging");
    });
    window.addEventListener("dragover", (event) => event.preventDefault());
    window.addEventListener("drop", (event) => {
      event.preventDefault(); // never navigate away to the dropped file
      depth = 0;
      elements.dropZone.classList.remove("dragging");
      const file = Array.from(event.dataTransfer?.files || []).find((item) => item.type.startsWith("image/"))
        || event.dataTransfer?.files?.[0];
      if (file && !state.request && !state.job) chooseFile(file);
    });
    document.addEventListener("paste", (event) => {
      const file = Array.from(event.clipboardData?.files || []).find((item) => item.type.startsWith("image/"));
      if (file && !state.request && !state.job) chooseFile(file);
    });
  }

  // -- errors -----------------------------------------------------------------------------

  function showError(code, message, hint) {
    elements.errorCode.textContent = code;
    elements.errorMessage.textContent = message;
    elements.errorHint.textContent = hint || "";
    elements.errorHint.hidden = !hint;
    elements.error.hidden = false;
  }

  function hideError() {
    elements.error.hidden = true;
  }

  /** The gateway's JSON error body ({"error": {"code", "message"}}) of a 4xx/5xx answer, with a hint. */
  function errorFromBody(status, statusText, bodyText, retryAfter) {
    let code = `http_${status}`;
    let message = statusText || "the gateway answered with an error";
    try {
      const payload = JSON.parse(bodyText);
      if (payload?.error?.code) {
        code = payload.error.code;
        message = payload.error.message || message;
      }
    } catch (error) { /* not the gateway's JSON error body: keep the status */ }
    return { code, message, hint: hintFor(code, retryAfter) };
  }

  function hintFor(code, retryAfter) {
    const hint = HINTS[code] || "";
    if (code === "overloaded" || code === "model_unavailable" || code === "spool_full") {
      return retryAfter ? `${hint}: try again in ${retryAfter} s.` : `${hint}: try again shortly.`;
    }
    return hint;
  }

  async function errorFromResponse(response) {
    let text = "";
    try {
      text = await response.text();
    } catch (error) { /* the body broke off: the status is all there is */ }
    return errorFromBody(response.status, response.statusText, text, response.headers.get("Retry-After"));
  }

  function fail(error) {
    finish();
    setState("error");
    showError(error.code, error.message, error.hint);
    announce(`Error: ${error.message}`);
    if (error.code === "unauthorized") {
      elements.apiKeyDetails.open = true;
      elements.apiKey.focus();
    }
  }

  function networkError(what) {
    return { code: "network_error", message: `Could not reach the gateway ${what}.`,
      hint: "Is it still running? Check the connection and try again." };
  }

  // -- the request: upload, then follow the job -------------------------------------------

  function startTicker() {
    state.startedAt = performance.now();
    const tick = () => {
      elements.elapsed.textContent = formatSeconds((performance.now() - state.startedAt) / 1000, 1);
      if (state.etaAt !== null) {
        const left = (state.etaAt - performance.now()) / 1000;
        elements.eta.textContent = left >= 1 ? `About ${formatSeconds(left)} left${state.etaNote}` : "Almost done";
      }
    };
    tick();
    state.ticker = setInterval(tick, ELAPSED_TICK_MS);
  }

  function stopTicker() {
    clearInterval(state.ticker);
    state.ticker = null;
  }

  function setRunning(running) {
    elements.enhanceButton.disabled = running || !state.file;
    elements.cancelButton.hidden = !running;
    elements.cancelButton.disabled = false;
    elements.progress.hidden = !running;
    for (const control of [elements.preset, elements.scale, elements.faces, elements.format, elements.fileInput]) {
      control.disabled = running;
    }
  }

  function authorization() {
    const key = elements.apiKey.value.trim();
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  /** fetch() on the gateway, with the API key when there is one. */
  function api(path, options = {}) {
    return fetch(path, { cache: "no-store", ...options, headers: { ...authorization(), ...(options.headers || {}) } });
  }

  function requestUrl() {
    const parameters = new URLSearchParams({
      preset: elements.preset.value,
      scale: elements.scale.value,
      faces: elements.faces.checked ? "true" : "false",
    });
    if (elements.format.value) parameters.set("format", elements.format.value);
    return `v1/jobs?${parameters}`;
  }

  /** What the gateway would refuse anyway, said before uploading (a refused upload can look
   * like a dropped connection to the browser). */
  function checkLimits(file) {
    if (file.size > limits.bytes) {
      return `the photo is ${formatBytes(file.size)}; this gateway takes at most ${formatBytes(limits.bytes)}`;
    }
    if (state.inputSize) {
      const pixels = state.inputSize.width * state.inputSize.height;
      const output = outputSizeFor(state.inputSize, Number(elements.scale.value));
      if (pixels > limits.inputPixels) {
        return `the photo has ${(pixels / 1e6).toFixed(1)} megapixels; this gateway takes at most ${(limits.inputPixels / 1e6).toFixed(1)}`;
      }
      if (output.width * output.height > limits.outputPixels) {
        return `the output would have ${(output.width * output.height / 1e6).toFixed(1)} megapixels; `
          + `this gateway makes at most ${(limits.outputPixels / 1e6).toFixed(1)}`;
      }
    }
    return "";
  }

  function setMeter(bar, text, done, total, unit) {
    if (total === null || total === undefined) {
      bar.removeAttribute("value"); // indeterminate: the total is not known yet
      bar.setAttribute("aria-valuetext", `${unit}: counting`);
      return;
    }
    bar.max = Math.max(1, total);
    bar.value = Math.min(done, total);
    bar.setAttribute("aria-valuetext", `${done} of ${total} ${unit}`);
    text.textContent = `${done} of ${total}`;
  }

  function enhance() {
    if (!state.file || state.request || state.job) return;
    hideError();
    saveApiKey();
    const file = state.file;
    const tooLarge = checkLimits(file);
    if (tooLarge) {
      setState("error");
      showError("image_too_large", tooLarge, HINTS.image_too_large);
      announce(`Error: ${tooLarge}`);
      return;
    }
    // XMLHttpRequest for the upload: fetch() reports no upload progress
    const request = new XMLHttpRequest();
    state.request = request;
    request.open("POST", requestUrl());
    request.responseType = "text";
    request.setRequestHeader("Content-Type", file.type && file.type.startsWith("image/") ? file.type : "application/octet-stream");
    for (const [name, value] of Object.entries(authorization())) request.setRequestHeader(name, value);

    setState("uploading");
    setRunning(true);
    state.etaAt = null;
    elements.eta.textContent = "";
    elements.progressBar.max = 100;
    elements.progressBar.value = 0;
    elements.progressBar.setAttribute("aria-valuetext", "0% uploaded");
    elements.tilesName.textContent = "Upload";
    elements.tilesText.textContent = "";
    elements.facesMeter.hidden = true;
    elements.progressLabel.textContent = "Uploading…";
    elements.progress.dataset.stage = "upload";
    elements.progress.scrollIntoView({ block: "nearest" }); // below the button: keep it in sight
    announce("Uploading the photo");
    startTicker();

    request.upload.onprogress = (event) => {
      if (!event.lengthComputable) return;
      const percent = Math.round((event.loaded / event.total) * 100);
      elements.progressBar.max = 100;
      elements.progressBar.value = percent;
      elements.progressBar.setAttribute("aria-valuetext", `${percent}% uploaded`);
      elements.tilesText.textContent = `${percent}% of ${formatBytes(event.total)}`;
    };
    request.onload = () => {
      state.request = null;
      if (request.status !== 202) {
        fail(errorFromBody(request.status, request.statusText, request.responseText,
          request.getResponseHeader("Retry-After")));
        return;
      }
      let job;
      try {
        job = JSON.parse(request.responseText);
      } catch (error) {
        fail({ code: "invalid_response", message: "The gateway's answer to the upload is not a job.", hint: "" });
        return;
      }
      follow(job, file);
    };
    request.onerror = () => fail(networkError("to upload the photo"));
    request.onabort = () => {
      finish();
      setState("cancelled");
      announce("Cancelled");
    };
    request.send(file);
  }

  /** Follow a job to its end: its event stream while that works, else GET every POLL_INTERVAL_MS.
   * EventSource cannot send an Authorization header, so with an API key the page polls. */
  function follow(job, file) {
    const followed = { id: job.id, file, events: null, poller: null, contactLostAt: null, cancelling: false, ended: false };
    state.job = followed;
    setState("working");
    showJob(job);
    if (!authorization().Authorization && "EventSource" in window) {
      const events = new EventSource(`v1/jobs/${encodeURIComponent(job.id)}/events`);
      followed.events = events;
      const onEvent = (event) => {
        if (state.job !== followed) return;
        let update;
        try {
          update = JSON.parse(event.data);
        } catch (error) {
          return; // a broken event: the next one, or the poll after a failure, says the same
        }
        showJob(update);
      };
      for (const name of ["progress", "done", "failed", "cancelled"]) events.addEventListener(name, onEvent);
      events.onerror = () => { // the stream failed or ended early: poll instead
        events.close();
        followed.events = null;
        if (state.job === followed && !followed.ended) poll(followed);
      };
    } else {
      poll(followed);
    }
  }

  async function poll(followed) {
    if (state.job !== followed || followed.ended) return;
    let response;
    try {
      response = await api(`v1/jobs/${encodeURIComponent(followed.id)}`);
    } catch (error) {
      response = null;
    }
    if (state.job !== followed) return;
    if (response === null || response.status >= 500) {
      // the gateway may be restarting (its jobs survive it): keep trying for a while
      followed.contactLostAt ??= performance.now();
      if (performance.now() - followed.contactLostAt > LOST_CONTACT_MS) {
        fail(networkError(`for ${formatSeconds(LOST_CONTACT_MS / 1000)} (job ${followed.id} may still finish there)`));
        return;
      }
      elements.progressLabel.textContent = "Lost contact with the gateway; trying again…";
      followed.poller = setTimeout(() => poll(followed), POLL_INTERVAL_MS * 2);
      return;
    }
    followed.contactLostAt = null;
    if (!response.ok) {
      const error = await errorFromResponse(response);
      if (error.code === "job_not_found") {
        error.message = "The job is gone from the gateway: deleted, or expired.";
        error.hint = "Enhance the photo again.";
      }
      fail(error);
      return;
    }
    showJob(await response.json());
    if (!followed.ended) followed.poller = setTimeout(() => poll(followed), POLL_INTERVAL_MS);
  }

  function stopFollowing(followed) {
    followed.ended = true;
    followed.events?.close();
    clearTimeout(followed.poller);
  }

  /** Show one state of the job (from the stream or a poll); at its end, the result or the error. */
  function showJob(job) {
    const followed = state.job;
    if (!followed || followed.ended || job.id !== followed.id) return;
    const progress = job.progress || {};
    const stage = job.status === "running" ? (progress.stage || "start") : job.status;
    elements.progress.dataset.stage = stage;
    const label = stage === "queued" && job.attempts > 0
      ? "Queued again: the gateway that ran it stopped"
      : (stage === "enhance" && !progress.faces ? STAGES.upscale : STAGES[stage] || stage);
    if (label !== elements.progressLabel.textContent) announce(label); // each stage once, not each tile
    elements.progressLabel.textContent = label;

    elements.tilesName.textContent = "Tiles";
    if (progress.tiles) {
      setMeter(elements.progressBar, elements.tilesText, progress.tiles.done, progress.tiles.total, "tiles");
    } else {
      setMeter(elements.progressBar, elements.tilesText, 0, null, "tiles");
      elements.tilesText.textContent = job.status === "queued" ? "waiting" : "planning";
    }
    elements.facesMeter.hidden = !progress.faces;
    if (progress.faces) {
      setMeter(elements.facesBar, elements.facesText, progress.faces.done, progress.faces.total, "faces");
      if (progress.faces.total === null) elements.facesText.textContent = "finding them";
    }
    if (typeof progress.eta_s === "number" && job.status === "running") {
      state.etaAt = performance.now() + progress.eta_s * 1000;
      state.etaNote = progress.eta_basis === "estimate" ? " (estimated from the models' speed)" : "";
    } else {
      state.etaAt = null;
      elements.eta.textContent = job.status === "queued" ? "Waiting for the jobs before it" : "";
    }

    if (job.status === "done") {
      stopFollowing(followed);
      fetchResult(followed, job);
    } else if (job.status === "failed") {
      stopFollowing(followed);
      const error = job.error || { code: "failed", message: "The job failed." };
      fail({ code: error.code, message: error.message, hint: HINTS[error.code] || "" });
    } else if (job.status === "cancelled") {
      stopFollowing(followed);
      if (followed.cancelling) {
        cancelled();
      } else {
        fail({ code: "cancelled", message: "The job was cancelled on the gateway.", hint: "Enhance the photo again." });
      }
    }
  }

  async function fetchResult(followed, job) {
    elements.progressLabel.textContent = job.result
      ? `Downloading the result (${formatBytes(job.result.bytes)})…` : "Downloading the result…";
    elements.cancelButton.disabled = true; // the job is done: nothing left to cancel
    elements.progress.dataset.stage = "download";
    state.etaAt = null;
    elements.eta.textContent = "";
    let response;
    let blob;
    try {
      response = await api(`v1/jobs/${encodeURIComponent(followed.id)}/result`);
      if (response.ok) blob = await response.blob();
    } catch (error) {
      fail(networkError("to fetch the result"));
      return;
    }
    if (state.job !== followed) return;
    if (!response.ok) {
      fail(await errorFromResponse(response));
      return;
    }
    const seconds = (performance.now() - state.startedAt) / 1000;
    finish();
    showResult(blob, (name) => response.headers.get(name), followed.file, seconds);
  }

  async function cancel() {
    if (state.request) {
      state.request.abort();
      return;
    }
    const followed = state.job;
    if (!followed || followed.ended) return;
    followed.cancelling = true;
    elements.cancelButton.disabled = true;
    elements.progressLabel.textContent = "Cancelling…";
    let response;
    try {
      response = await api(`v1/jobs/${encodeURIComponent(followed.id)}`, { method: "DELETE" });
    } catch (error) {
      fail(networkError("to cancel the job"));
      return;
    }
    if (state.job !== followed) return;
    if (response.status === 200 || response.status === 204) { // cancelled, or it had just finished: deleted
      stopFollowing(followed);
      cancelled();
    } else if (response.status === 202) {
      // another gateway runs it: the cancel stands and lands within a second or so; the
      // stream (or the poll) brings the cancelled state
    } else {
      followed.cancelling = false;
      elements.cancelButton.disabled = false;
      const error = await errorFromResponse(response);
      showError(error.code, `Could not cancel: ${error.message}`, error.hint);
    }
  }

  function cancelled() {
    finish();
    setState("cancelled");
    announce("Cancelled");
  }

  function finish() {
    stopTicker();
    if (state.job) stopFollowing(state.job);
    state.request = null;
    state.job = null;
    state.etaAt = null;
    setRunning(false);
  }

  // -- the result -------------------------------------------------------------------------

  /** The enhanced photo (``blob``) with its answer's headers (``headers(name)``). */
  function showResult(blob, headers, file, seconds) {
    const [width, height] = (headers("X-Output-Size") || "").split("x").map(Number);
    const scale = Number(elements.scale.value);
    state.outputSize = width && height ? { width, height } : (state.inputSize && outputSizeFor(state.inputSize, scale));
    const url = replaceUrl("resultUrl", blob);

    elements.afterImage.onload = () => {
      if (!state.outputSize) {
        state.outputSize = { width: elements.afterImage.naturalWidth, height: elements.afterImage.naturalHeight };
      }
      layoutCompare();
    };
    elements.afterImage.src = url;
    elements.compare.classList.remove("no-before");
    elements.range.disabled = false;
    elements.beforeImage.onerror = () => { // a format the browser cannot show (TIFF): the result alone
      elements.compare.classList.add("no-before");
      elements.range.disabled = true;
    };
    elements.beforeImage.src = state.fileUrl;
    elements.placeholder.hidden = true;
    elements.viewport.hidden = false;
    elements.details.hidden = false;
    setSplit(50);
    layoutCompare();

    const detected = Number(headers("X-Faces-Detected") || 0);
    const enhanced = Number(headers("X-Faces-Enhanced") || 0);
    const timings = parseServerTiming(headers("Server-Timing"));
    const lookedForFaces = headers("X-Face-Detection") !== "skipped"; // faces off, or a preset without a face model
    elements.facesResult.textContent = !lookedForFaces ? "not enhanced"
      : detected === 0 ? "none found" : `${enhanced} of ${detected} enhanced`;
    const inputText = state.inputSize ? `${state.inputSize.width}×${state.inputSize.height} → ` : "";
    elements.sizeResult.textContent = state.outputSize
      ? `${inputText}${state.outputSize.width}×${state.outputSize.height}` : "";
    elements.bytesResult.textContent = `${formatBytes(file.size)} → ${formatBytes(blob.size)}`;
    elements.timeResult.textContent = `${seconds.toFixed(1)} s`;
    showTimings(timings);
    const requestId = headers("X-Request-Id");
    elements.requestId.textContent = requestId ? `Request id ${requestId}.` : "";

    const type = (blob.type || headers("Content-Type") || "image/png").split(";")[0];
    const extension = { "image/jpeg": "jpg", "image/webp": "webp" }[type] || "png";
    const stem = (file.name || "photo").replace(/\.[^.]+$/, "") || "photo";
    elements.downloadLink.href = url;
    elements.downloadLink.download = `${stem}-chaoqing-${scale}x.${extension}`;
    elements.downloadLink.textContent = `Download ${extension.toUpperCase()} (${formatBytes(blob.size)})`;

    setState("done");
    announce(`Done in ${seconds.toFixed(1)} seconds. Use the divider to compare before and after.`);
  }

  function showTimings(timings) {
    const total = timings.find((timing) => timing.name === "total")?.ms
      || Math.max(1, ...timings.map((timing) => timing.ms));
    elements.timings.replaceChildren(...timings.map((timing) => {
      const item = document.createElement("li");
      if (timing.name === "total") item.className = "total";
      const stage = document.createElement("span");
      stage.className = "stage";
      stage.textContent = timing.name;
      const bar = document.createElement("span");
      bar.className = "bar";
      const fill = document.createElement("span");
      fill.style.width = `${Math.min(100, (timing.ms / total) * 100).toFixed(1)}%`;
      bar.append(fill);
      const ms = document.createElement("span");
      ms.className = "ms";
      ms.textContent = formatMs(timing.ms);
      item.append(stage, bar, ms);
      return item;
    }));
  }

  // -- the comparison slider --------------------------------------------------------------

  function setSplit(percent) {
    const clamped = Math.min(100, Math.max(0, percent));
    elements.range.value = String(clamped);
    elements.compare.style.setProperty("--split", `${clamped}%`);
    elements.range.setAttribute("aria-valuetext", `${Math.round(clamped)}% original`);
  }

  function layoutCompare() {
    const size = state.outputSize;
    if (!size || elements.viewport.hidden) return;
    let scale;
    if (state.zoom === "fit") {
      const availableWidth = elements.viewport.parentElement.clientWidth;
      const availableHeight = Math.max(240, window.innerHeight * 0.78);
      scale = Math.min(availableWidth / size.width, availableHeight / size.height);
    } else {
      scale = Number(state.zoom);
    }
    elements.viewport.classList.toggle("fit", state.zoom === "fit");
    elements.compare.style.width = `${Math.max(1, Math.floor(size.width * scale))}px`;
    elements.compare.style.height = `${Math.max(1, Math.floor(size.height * scale))}px`;
  }

  function installCompare() {
    elements.range.addEventListener("input", () => setSplit(Number(elements.range.value)));
    elements.range.addEventListener("keydown", (event) => {
      const moves = { ArrowLeft: -KEY_STEP_PERCENT, ArrowDown: -KEY_STEP_PERCENT, ArrowRight: KEY_STEP_PERCENT,
        ArrowUp: KEY_STEP_PERCENT, PageDown: -10, PageUp: 10 };
      if (event.key in moves) {
        setSplit(Number(elements.range.value) + moves[event.key]);
      } else if (event.key === "Home" || event.key === "End") {
        setSplit(event.key === "Home" ? 0 : 100);
      } else {
        return;
      }
      event.preventDefault();
    });
    // pointer: the divider follows the pointer exactly (a native range maps through its thumb)
    let dragging = null;
    const follow = (event) => {
      const box = elements.compare.getBoundingClientRect();
      setSplit(((event.clientX - box.left) / box.width) * 100);
    };
    elements.compare.addEventListener("pointerdown", (event) => {
      if (event.button !== 0) return;
      dragging = event.pointerId;
      elements.compare.setPointerCapture(event.pointerId);
      elements.range.focus({ preventScroll: true });
      follow(event);
      event.preventDefault();
    });
    elements.compare.addEventListener("pointermove", (event) => {
      if (event.pointerId === dragging) follow(event);
    });
    const stop = (event) => {
      if (event.pointerId === dragging) dragging = null;
    };
    elements.compare.addEventListener("pointerup", stop);
    elements.compare.addEventListener("pointercancel", stop);

    for (const button of elements.zoomButtons) {
      button.addEventListener("click", () => {
        state.zoom = button.dataset.zoom;
        for (const other of elements.zoomButtons) other.setAttribute("aria-pressed", String(other === button));
        layoutCompare();
      });
    }
    window.addEventListener("resize", () => {
      if (state.zoom === "fit") layoutCompare();
    });
  }

  // -- start ------------------------------------------------------------------------------

  function install() {
    installFileInputs();
    installCompare();
    elements.form.addEventListener("submit", (event) => {
      event.preventDefault();
      enhance();
    });
    elements.cancelButton.addEventListener("click", cancel);
    elements.againButton.addEventListener("click", () => elements.fileInput.click());
    elements.scale.addEventListener("input", updateScaleText);
    elements.preset.addEventListener("change", updatePresetText);
    elements.apiKey.addEventListener("change", saveApiKey);
    elements.forgetKey.addEventListener("click", () => {
      elements.apiKey.value = "";
      saveApiKey();
      elements.apiKey.focus();
    });
    loadApiKey();
    updateScaleText();
    loadApiDescription();
  }

  install();
})();
