"use strict";
// The page keeps the conversation in OpenAI form and streams each answer from /v1/chat/completions.
const $ = (id) => document.getElementById(id);
let history = [];             // {role, content} messages sent with every request; New chat starts a new array
let attachments = [];         // the images for the next question: {url (a data: URL), name (the file's)}
let model = null;
let controller = null;        // the running request's AbortController

function apiKey() { return sessionStorage.getItem("kimivl-key") || ""; }
function headers() {
  const h = { "Content-Type": "application/json" };
  if (apiKey()) h["Authorization"] = "Bearer " + apiKey();
  return h;
}
function showError(text) { $("error").textContent = text || ""; }
const ONLY_IMAGES = "only images can be attached here; send videos through the API";

async function loadModel() {
  let r, body = null;
  try {
    r = await fetch("v1/models", { headers: headers() });
    body = await r.json();
  } catch (e) {
    if (!r) { showError("the server cannot be reached (" + e.message + ")"); return; }
  }
  if (r.status === 401) {
    $("key-form").classList.add("shown");
    showError(apiKey() ? "the API key was refused" : "");
    return;
  }
  if (!r.ok || !body || !Array.isArray(body.data) || !body.data.length) {
    const why = (body && body.error && body.error.message) || "HTTP " + r.status + ", not a list of models";
    showError("the server's /v1/models failed: " + why);
    return;
  }
  $("key-form").classList.remove("shown");
  model = body.data[0].id;
  $("model").textContent = model;
  showError("");
}

// what an HTTP header can carry, as the server checks it: printable ASCII, no spaces around it
const KEY_PATTERN = /^[!-~]([ -~]*[!-~])?$/;

$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const key = $("key").value;
  if (!KEY_PATTERN.test(key)) {
    showError("an API key is printable ASCII (letters, digits, punctuation) without spaces around it; check the key");
    return;
  }
  sessionStorage.setItem("kimivl-key", key);
  $("key").value = "";
  loadModel();
});

function addImages(files) {
  const skipped = [];
  for (const file of files) {
    if (!file.type.startsWith("image/")) { skipped.push(file.name); continue; }
    const reader = new FileReader();
    reader.onload = () => { attachments.push({ url: reader.result, name: file.name }); drawAttachments(); };
    reader.readAsDataURL(file);
  }
  if (skipped.length) showError(ONLY_IMAGES + " (" + skipped.join(", ") + " left out)");
  else if (files.length && $("error").textContent.startsWith(ONLY_IMAGES)) showError("");
}
function imageAlt(i, name) { return "image " + (i + 1) + (name ? ": " + name : ""); }
function drawAttachments() {
  const box = $("attachments");
  box.replaceChildren();
  attachments.forEach(({ url, name }, i) => {
    const fig = document.createElement("figure");
    const img = document.createElement("img");
    img.src = url;
    img.alt = "attached " + imageAlt(i, name);
    const del = document.createElement("button");
    del.type = "button";
    del.textContent = "×";
    del.title = "remove image " + (i + 1);
    del.setAttribute("aria-label", del.title);
    del.addEventListener("click", () => {
      attachments.splice(i, 1);
      drawAttachments();
      const left = box.querySelectorAll("button");  // focus the next remove button, else the last, else the picker
      (left[i] || left[left.length - 1] || $("file")).focus();
    });
    fig.append(img, del);
    box.append(fig);
  });
}
$("file").addEventListener("change", (e) => { addImages(e.target.files); e.target.value = ""; });
document.addEventListener("paste", (e) => addImages(e.clipboardData.files));
document.addEventListener("dragover", (e) => { e.preventDefault(); $("composer").classList.add("dragging"); });
document.addEventListener("dragleave", () => $("composer").classList.remove("dragging"));
document.addEventListener("drop", (e) => {
  e.preventDefault();
  $("composer").classList.remove("dragging");
  addImages(e.dataTransfer.files);
});

// each turn starts with who speaks, for screen readers only (the colours tell it on screen)
function turn(role, who) {
  const div = document.createElement("article");
  div.className = "turn " + role;
  const said = document.createElement("span");
  said.className = "visually-hidden";
  said.textContent = who + ": ";
  div.append(said);
  $("chat").append(div);
  return div;
}

function userTurn(text, images) {
  const div = turn("user", "You");
  images.forEach(({ url, name }, i) => {
    const img = document.createElement("img");
    img.src = url;
    img.alt = imageAlt(i, name);
    div.append(img);
  });
  const p = document.createElement("p");
  p.className = "question";
  p.textContent = text;
  const note = document.createElement("div");
  note.className = "note";
  note.setAttribute("role", "status");
  div.append(p, note);
  return div;
}

function assistantTurn() {
  const div = turn("assistant", "Kimi-VL");
  div.dataset.state = "streaming";
  div.setAttribute("aria-busy", "true");  // the log reads the answer once it is whole, not token by token
  div.insertAdjacentHTML("beforeend",
    '<details class="reasoning"><summary>Reasoning</summary><pre class="reasoning-text"></pre></details>' +
    '<pre class="answer"></pre><div class="note" role="status"></div>');
  return div;
}

function idle() {
  const stopFocused = document.activeElement === $("stop");  // a disabled button drops its focus to the page
  controller = null;
  $("send").disabled = false;
  $("stop").disabled = true;
  if (stopFocused) $("question").focus();
}

// whether the conversation is scrolled to (near) its end, so that a new piece of the answer should keep it there
function atBottom(chat) { return chat.scrollHeight - chat.scrollTop - chat.clientHeight < 30; }

async function send() {
  const text = $("question").value.trim();
  if (controller || (!text && !attachments.length)) return;
  if (!model) { await loadModel(); if (!model) return; }
  const thread = history;       // this conversation: New chat replaces `history` while the answer streams
  const images = attachments;
  const content = images.map(({ url }) => ({ type: "image_url", image_url: { url } }));
  if (text) content.push({ type: "text", text });
  const question = userTurn(text, images);
  thread.push({ role: "user", content });
  attachments = [];
  drawAttachments();
  $("question").value = "";
  const div = assistantTurn();
  const reasoningBox = div.querySelector("details"), reasoning = div.querySelector(".reasoning-text");
  const answer = div.querySelector(".answer"), note = div.querySelector(".note");
  const body = { model, messages: thread, stream: true, temperature: Number($("temperature").value),
                 top_p: Number($("top-p").value) };
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  const chat = $("chat");
  chat.scrollTop = chat.scrollHeight;
  const mine = new AbortController();
  controller = mine;
  const fromSend = document.activeElement === $("send");
  $("send").disabled = true;
  $("stop").disabled = false;
  if (fromSend) $("stop").focus();
  let state = "done", finished = false;
  try {
    const r = await fetch("v1/chat/completions",
                          { method: "POST", headers: headers(), body: JSON.stringify(body), signal: mine.signal });
    if (!r.ok) {
      const err = await r.json().catch(() => ({}));
      if (r.status === 401) $("key-form").classList.add("shown");
      throw new Error((err.error && err.error.message) || "HTTP " + r.status);
    }
    const reader = r.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let at;
      while ((at = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, at);
        buffer = buffer.slice(at + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") { finished = true; continue; }
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const follow = atBottom(chat);  // a reader who scrolled up stays where they are
        for (const choice of chunk.choices || []) {
          const d = choice.delta || {};
          if (d.reasoning_content) { reasoning.textContent += d.reasoning_content; reasoningBox.classList.add("has-text"); }
          if (d.content) answer.textContent += d.content;
          if (choice.finish_reason) { div.dataset.finish = choice.finish_reason; finished = true; }
        }
        if (follow) chat.scrollTop = chat.scrollHeight;
      }
    }
    if (!finished) {  // no finish reason and no [DONE]: the server stopped or the connection broke
      throw new Error("cut off: the stream ended before the answer did");
    }
  } catch (e) {
    if (e.name === "AbortError") { state = "stopped"; note.textContent = "stopped"; }
    else if (e instanceof TypeError) {  // fetch's network failure: the server went away, or was never reached
      state = "error";
      const said = answer.textContent || reasoning.textContent;
      note.textContent = (said ? "cut off: the connection to the server was lost" : "the server could not be reached")
                         + " (" + e.message + ")";
    } else { state = "error"; note.textContent = e.message; }
  } finally {
    div.removeAttribute("aria-busy");
    if (controller === mine) idle();
  }
  if (thread !== history) return;  // New chat was clicked: this answer belonged to the conversation it cleared
  div.dataset.state = state;
  if (state === "error" && !answer.textContent) {  // nothing came back: the question leaves the conversation
    thread.pop();
    question.dataset.state = "unsent";
    const note = question.querySelector(".note");
    if (!$("question").value.trim() && !attachments.length) {
      $("question").value = text;
      attachments = images;
      drawAttachments();
      note.textContent = "not sent: the question is back in the box below";
    } else {  // the box holds a new draft: it stays, and the question is not put back
      note.textContent = "not sent";
    }
    return;
  }
  thread.push({ role: "assistant", content: answer.textContent });
  if (state === "done" && div.dataset.finish === "length") {
    note.textContent = "cut off: the answer reached max tokens (raise it at the top)";
  }
}

$("send").addEventListener("click", send);
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });
$("question").addEventListener("keydown", (e) => {
  if (e.isComposing || e.keyCode === 229) return;  // this Enter confirms an input method's (CJK) composition
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); }
});
$("clear").addEventListener("click", () => {
  if (controller) controller.abort();
  idle();
  history = [];
  $("chat").replaceChildren();
});
loadModel();
