// The operations console: the admin key lives in this tab's sessionStorage and travels only
// in the Authorization header; the overview is read every second; the switch form checks
// types and ranges before sending and shows the server's verdict (which has the last word)
// and what changed. Data from the server is put in the page as text, never as markup.

const KEY = "im.console.adminKey";
const REFRESH_MS = 1000;
const HISTORY = 60; // samples kept per instance for the sparkline
const MAX_COUNT = 1000000000;
const MAX_NAME = 128;

const $ = (id) => document.getElementById(id);
const form = $("switches-form");
const pushForm = $("push-form");
let key = sessionStorage.getItem(KEY);
let timer = null;
let loadedVersion = null;
const history = new Map(); // instance -> recent messages/s

// -- talking to center ---------------------------------------------------------------------

async function call(method, path, body) {
  const headers = { Authorization: `Bearer ${key}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    cache: "no-store",
  });
  let data = null;
  try {
    data = await response.json();
  } catch {
    data = null;
  }
  return { status: response.status, data };
}

function errorText(answer) {
  return answer.data?.error?.message ?? `HTTP ${answer.status}`;
}

// -- logging in ----------------------------------------------------------------------------

function showLogin(message) {
  clearTimeout(timer);
  $("login").hidden = false;
  $("dashboard").hidden = true;
  $("logout").hidden = true;
  $("login-error").textContent = message;
  setStatus("", false);
}

function forgetKey(message) {
  key = null;
  sessionStorage.removeItem(KEY);
  history.clear();
  showLogin(message);
}

async function start() {
  if (!key) return showLogin("");
  let answer;
  try {
    answer = await call("GET", "/v1/admin/switches");
  } catch (err) {
    return showLogin(`center unreachable: ${err}`);
  }
  if (answer.status !== 200) return forgetKey(errorText(answer));
  sessionStorage.setItem(KEY, key);
  $("login").hidden = true;
  $("dashboard").hidden = false;
  $("logout").hidden = false;
  fillForm(answer.data);
  refresh();
}

$("login-form").addEventListener("submit", (event) => {
  event.preventDefault();
  key = $("key").value.trim();
  $("key").value = "";
  start();
});

$("logout").addEventListener("click", () => forgetKey(""));

// -- the live overview ---------------------------------------------------------------------

function setStatus(text, bad) {
  $("status").textContent = text;
  $("status").classList.toggle("bad", bad);
}

async function refresh() {
  clearTimeout(timer);
  try {
    const answer = await call("GET", "/v1/admin/overview");
    if (answer.status === 401 || answer.status === 403) return forgetKey(errorText(answer));
    if (answer.status === 200) {
      render(answer.data);
      setStatus(`updated ${new Date(answer.data.at).toLocaleTimeString()}`, false);
    } else {
      setStatus(errorText(answer), true);
    }
  } catch (err) {
    setStatus(`center unreachable: ${err}`, true);
  }
  if (key) timer = setTimeout(refresh, REFRESH_MS);
}

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function fixed(value) {
  return value === null || value === undefined ? "–" : value.toFixed(value < 10 ? 1 : 0);
}

function reasons(map, format) {
  const parts = Object.entries(map ?? {})
    .filter(([, n]) => n > 0)
    .map(([reason, n]) => `${reason} ${format(n)}`);
  return parts.length ? parts.join(", ") : "–";
}

function sparkline(values) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("viewBox", `0 0 ${HISTORY} 24`);
  svg.setAttribute("preserveAspectRatio", "none");
  const top = Math.max(1, ...values);
  const line = document.createElementNS(ns, "polyline");
  const start = HISTORY - values.length;
  const points = values.map((v, i) => `${start + i},${23 - (22 * v) / top}`);
  line.setAttribute("points", points.join(" "));
  svg.append(line);
  return svg;
}

function render(data) {
  $("problems").textContent = data.errors.join("; ");
  const body = $("instances").tBodies[0];
  body.replaceChildren();
  const live = new Set();
  for (const node of data.instances) {
    live.add(node.instance);
    const rates = history.get(node.instance) ?? [];
    if (node.msgs_per_s !== null && node.msgs_per_s !== undefined) {
      rates.push(node.msgs_per_s);
      if (rates.length > HISTORY) rates.shift();
    }
    history.set(node.instance, rates);
    const row = body.insertRow();
    row.dataset.instance = node.instance;
    if (node.draining) row.className = "draining";
    cell(row, node.draining ? `${node.instance} (draining)` : node.instance).title = node.ws;
    cell(row, node.idc);
    cell(row, node.connections ?? node.conns, "num");
    cell(row, fixed(node.msgs_per_s), "num");
    cell(row, "").append(sparkline(rates));
    cell(row, node.error ? node.error : reasons(node.drops_per_s, fixed));
    cell(row, reasons(node.drops, (n) => String(Math.round(n))));
    cell(row, node.rooms ?? "–", "num");
    cell(row, node.queued ?? "–", "num");
  }
  for (const name of [...history.keys()]) if (!live.has(name)) history.delete(name);

  const rooms = $("rooms").tBodies[0];
  rooms.replaceChildren();
  for (const room of data.rooms) {
    const row = rooms.insertRow();
    row.dataset.room = room.room;
    cell(row, room.product);
    cell(row, room.room);
    cell(row, room.members, "num");
    cell(row, Object.entries(room.instances).map(([i, n]) => `${i}: ${n}`).join(", "));
  }

  const { version, switches } = data.switches;
  $("switches-version").textContent = `version ${version}`;
  $("switches-doc").textContent = JSON.stringify(switches, null, 2);
  $("switches-stale").textContent =
    loadedVersion !== null && version !== loadedVersion
      ? `The switches changed to version ${version} since the form was loaded; ` +
        `"Load current" to edit them.`
      : "";

  const select = $("push-product");
  if (select.options.length === 0) {
    for (const product of data.products) select.add(new Option(product, product));
  }
}

// -- the switches form ---------------------------------------------------------------------

const JSON_FIELDS = ["msg_type_ratio", "common_msg", "room_pin", "idc_budget"];
const COUNT_FIELDS = ["room_budget", "shard_size"];

function fillForm({ version, switches }) {
  loadedVersion = version;
  const f = form.elements;
  f.big_rooms.value = switches.big_rooms.join(", ");
  [f.st0.value, f.st1.value, f.st2.value] = switches.size_thresholds;
  for (const name of COUNT_FIELDS) f[name].value = switches[name];
  for (const name of JSON_FIELDS) f[name].value = JSON.stringify(switches[name]);
  f.merge_likes.checked = switches.merge_likes;
  f.compress_complex.checked = switches.compress_complex;
  f.float_range.value = switches.float_range;
  clearProblems();
}

function clearProblems() {
  for (const small of form.querySelectorAll("small.problem")) small.textContent = "";
  for (const input of form.querySelectorAll("[aria-invalid]")) {
    input.removeAttribute("aria-invalid");
  }
  $("switches-error").textContent = "";
}

function markProblem(field, message) {
  const small = form.querySelector(`small.problem[data-for="${field}"]`);
  if (small) small.textContent = message;
  const names = field === "size_thresholds" ? ["st0", "st1", "st2"] : [field];
  for (const name of names) form.elements[name]?.setAttribute("aria-invalid", "true");
}

function integer(text, min, max) {
  const value = Number(text.trim());
  if (text.trim() === "" || !Number.isInteger(value)) return [null, "must be a whole number"];
  if (value < min || value > max) return [null, `must be between ${min} and ${max}`];
  return [value, null];
}

function isName(value) {
  return typeof value === "string" && value.length >= 1 && value.length <= MAX_NAME;
}

function jsonObject(text, checkValue) {
  let value;
  try {
    value = JSON.parse(text.trim() || "{}");
  } catch {
    return [null, "must be JSON"];
  }
  if (value === null || typeof value !== "object" || Array.isArray(value)) {
    return [null, "must be a JSON object"];
  }
  for (const [name, item] of Object.entries(value)) {
    if (!isName(name)) {
      return [null, `name ${JSON.stringify(name)} must have 1 to ${MAX_NAME} characters`];
    }
    const problem = checkValue(item);
    if (problem) return [null, `${name}: ${problem}`];
  }
  return [value, null];
}

const countValue = (max) => (v) =>
  Number.isInteger(v) && v >= 0 && v <= max ? null : `must be a whole number from 0 to ${max}`;
const VALUE_CHECKS = {
  msg_type_ratio: countValue(100),
  common_msg: (v) => (Array.isArray(v) && v.every(isName) ? null : "must be a list of type names"),
  room_pin: (v) => (isName(v) ? null : "must be a worker name"),
  idc_budget: countValue(MAX_COUNT),
};

/** The document the form describes, and the problems found in it (field -> message). */
function readForm() {
  const f = form.elements;
  const document_ = {};
  const problems = {};
  const rooms = f.big_rooms.value.split(",").map((s) => s.trim()).filter(Boolean);
  if (rooms.some((r) => r.length > MAX_NAME)) {
    problems.big_rooms = `names have at most ${MAX_NAME} characters`;
  }
  document_.big_rooms = rooms;
  const thresholds = [];
  for (const name of ["st0", "st1", "st2"]) {
    const [value, problem] = integer(f[name].value, 1, MAX_COUNT);
    if (problem) problems.size_thresholds = `each ${problem}`;
    thresholds.push(value);
  }
  const [low, mid, high] = thresholds;
  if (!problems.size_thresholds && !(low < mid && mid < high)) {
    problems.size_thresholds = "must be strictly ascending";
  }
  document_.size_thresholds = thresholds;
  for (const name of COUNT_FIELDS) {
    const [value, problem] = integer(f[name].value, 0, MAX_COUNT);
    if (problem) problems[name] = problem;
    document_[name] = value;
  }
  for (const name of JSON_FIELDS) {
    const [value, problem] = jsonObject(f[name].value, VALUE_CHECKS[name]);
    if (problem) problems[name] = problem;
    document_[name] = value;
  }
  document_.merge_likes = f.merge_likes.checked;
  document_.compress_complex = f.compress_complex.checked;
  const range = Number(f.float_range.value.trim());
  if (f.float_range.value.trim() === "" || !(range >= 0 && range <= 1)) {
    problems.float_range = "must be a number from 0 to 1";
  }
  document_.float_range = range;
  return { document: document_, problems };
}

function showChanges(changed) {
  const table = $("switches-changed");
  const body = table.tBodies[0];
  body.replaceChildren();
  for (const [field, { old, new: now }] of Object.entries(changed)) {
    const row = body.insertRow();
    row.dataset.field = field;
    cell(row, field);
    cell(row, JSON.stringify(old));
    cell(row, JSON.stringify(now));
  }
  table.hidden = body.rows.length === 0;
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  clearProblems();
  $("switches-result").textContent = "";
  const { document: doc, problems } = readForm();
  if (Object.keys(problems).length) {
    for (const [field, message] of Object.entries(problems)) markProblem(field, message);
    $("switches-error").textContent = "Not sent: fix the marked fields.";
    return;
  }
  let answer;
  try {
    answer = await call("PUT", "/v1/admin/switches", doc);
  } catch (err) {
    $("switches-error").textContent = `center unreachable: ${err}`;
    return;
  }
  if (answer.status === 401 || answer.status === 403) return forgetKey(errorText(answer));
  if (answer.status !== 200) {
    const field = String(answer.data?.error?.field ?? "").split(/[.[]/)[0];
    $("switches-error").textContent = `Refused (HTTP ${answer.status}): ${errorText(answer)}`;
    if (field) markProblem(field, errorText(answer));
    return;
  }
  const names = Object.keys(answer.data.changed);
  $("switches-result").textContent = `Version ${answer.data.version} applied; ${
    names.length ? `changed: ${names.join(", ")}` : "nothing changed"
  }.`;
  showChanges(answer.data.changed);
  fillForm(answer.data);
  refresh();
});

$("switches-reload").addEventListener("click", async () => {
  const answer = await call("GET", "/v1/admin/switches");
  if (answer.status === 200) fillForm(answer.data);
  else $("switches-error").textContent = errorText(answer);
});

// -- the test push -------------------------------------------------------------------------

pushForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  const f = pushForm.elements;
  const result = $("push-result");
  result.className = "";
  let body;
  try {
    body = JSON.parse(f.body.value);
  } catch {
    result.className = "error";
    result.textContent = "Not sent: the body must be JSON.";
    return;
  }
  const target = f.target.value.trim();
  if (!isName(target)) {
    result.className = "error";
    result.textContent = `Not sent: name a ${f.kind.value === "uid" ? "user" : "room"}.`;
    return;
  }
  const push = {
    product: f.product.value,
    [f.kind.value]: target,
    type: f.type.value,
    pri: f.pri.value,
    body,
  };
  const answer = await call("POST", "/v1/admin/push", push);
  if (answer.status === 200) {
    const what = f.kind.value === "uid" ? "user" : "room";
    result.textContent = `Sent ${answer.data.id} to ${what} ${target}.`;
  } else {
    result.className = "error";
    result.textContent = `Refused (HTTP ${answer.status}): ${errorText(answer)}`;
  }
});

start();
