// DOM helpers shared by the page and its panels: one element builder, and the small formatting
// rules (a person's colour, times, field errors) that every panel must show alike.
//
// User data only ever reaches the DOM through textContent and attributes; never innerHTML.

/** Builds an element: `props` are attributes, plus `class`, `text` and `style` (custom props). */
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key === "style") for (const [p, v] of Object.entries(value)) node.style.setProperty(p, v);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children) if (child !== null && child !== undefined && child !== false) node.append(child);
  return node;
}

/** A stable hue from a user id, for the colour that marks a person. */
export function hueOf(id) {
  let h = 2166136261;
  for (let i = 0; i < id.length; i++) {
    h ^= id.charCodeAt(i);
    h = Math.imul(h, 16777619);
  }
  return (h >>> 0) % 360;
}

/** A time as shown (hours and minutes today, with the date otherwise) and in full (a tooltip). */
export function formatTime(iso) {
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return { short: "", full: "" };
  const sameDay = date.toDateString() === new Date().toDateString();
  const short = sameDay
    ? date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
    : date.toLocaleString([], { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
  return { short, full: date.toLocaleString() };
}

/** A `<time>` element for an RFC 3339 instant. */
export function timeNode(at, className = "msg-time") {
  const { short, full } = formatTime(at);
  return el("time", { class: className, datetime: at, title: full, text: short });
}

/** Shows (or clears, with "") the error of one form field, marking the field invalid. */
export function showFieldError(input, errorNode, message) {
  errorNode.textContent = message;
  errorNode.hidden = !message;
  if (message) input.setAttribute("aria-invalid", "true");
  else input.removeAttribute("aria-invalid");
}

/** JSON for people to read: indented, and cut at `max` characters. */
export function prettyJson(value, max = 4000) {
  let text;
  try {
    text = JSON.stringify(value, null, 2) ?? "null";
  } catch {
    text = String(value);
  }
  return text.length > max ? `${text.slice(0, max)}\n…` : text;
}

/** How a refused request reads in the page: the server's message and its code. */
export function describeError(error) {
  if (error?.code === "disconnected") return "Not connected to the server; try again once it is back.";
  if (error?.code === "timeout") return "The server did not answer in time.";
  const message = error?.message || "something went wrong";
  return error?.code ? `${message} (${error.code})` : message;
}

/** Reads an integer field: `null` when empty, NaN when it is not a whole number. */
export function intField(input) {
  const raw = input.value.trim();
  if (raw === "") return null;
  return /^-?\d+$/.test(raw) ? Number(raw) : NaN;
}
