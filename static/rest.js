// The page's REST calls (`/v1/…`, see PROTOCOL.md): JSON in and out, the token as a bearer, every
// request bounded in time, and REST errors (`{"error":{"code","message"}}`) turned into the same
// shape of error the socket client gives, so the panels report both alike.

import { RequestError } from "./client.js";

const TIMEOUT_MS = 10_000;

/**
 * Sends one request and resolves with the parsed JSON body. Rejects with a RequestError: the
 * server's code and message, or `disconnected` when the request never got an answer.
 */
export async function restJson(path, { token = "", method = "GET", body } = {}) {
  const headers = { Accept: "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
      signal: AbortSignal.timeout(TIMEOUT_MS),
    });
  } catch (err) {
    const code = err?.name === "TimeoutError" ? "timeout" : "disconnected";
    throw new RequestError(code, "the server could not be reached");
  }
  let parsed = null;
  try {
    parsed = await response.json();
  } catch {
    parsed = null;
  }
  if (!response.ok) {
    const error = parsed?.error;
    throw new RequestError(error?.code || `http_${response.status}`, error?.message || `HTTP ${response.status}`);
  }
  return parsed;
}

/** `/v1/sessions/{id}…` with the id escaped. */
export function sessionPath(session, rest = "") {
  return `/v1/sessions/${encodeURIComponent(session)}${rest}`;
}
