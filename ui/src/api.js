// The REST API client: bearer token, JSON, RFC 9457 problem documents turned into ApiError,
// ETag / If-Match on updates, Idempotency-Key on POSTs that start work, cursor pages.

let base = '';
let token = null;
let onUnauthorized = () => {};

/** Sets where the API is, the bearer credential, and what to do on a 401. */
export function configure(options) {
  if ('base' in options) base = (options.base || '').replace(/\/$/, '');
  if ('token' in options) token = options.token;
  if ('onUnauthorized' in options) onUnauthorized = options.onUnauthorized;
}

/** An API failure: `detail` for people, `fields` (JSON path -> message) for forms, `requestId` for support. */
export class ApiError extends Error {
  constructor({ status, title, detail, type, requestId, errors }) {
    super(detail || title || `HTTP ${status}`);
    this.status = status;
    this.title = title || '';
    this.detail = detail || title || `HTTP ${status}`;
    this.type = type || 'about:blank';
    this.requestId = requestId || null;
    this.errors = errors || [];
    this.fields = new Map(this.errors.map((e) => [e.field, e.message]));
  }
}

/** A fresh key for `Idempotency-Key`: the same key for a retried click is the caller's business. */
export const newIdempotencyKey = () => crypto.randomUUID?.() ?? `${Date.now()}-${Math.random().toString(36).slice(2)}`;

function url(path, query) {
  const u = new URL(`${base}/api/v1${path}`, location.origin);
  for (const [k, v] of Object.entries(query || {})) {
    if (v !== undefined && v !== null && v !== '') u.searchParams.set(k, String(v));
  }
  return u.toString();
}

async function problemOf(res) {
  const requestId = res.headers.get('x-request-id');
  let doc = {};
  if (/json/.test(res.headers.get('content-type') || '')) {
    doc = await res.json().catch(() => ({}));
  }
  return new ApiError({
    status: res.status,
    title: doc.title || res.statusText,
    detail: doc.detail || doc.title || defaultDetail(res.status),
    type: doc.type,
    requestId: doc.request_id || requestId,
    errors: Array.isArray(doc.errors) ? doc.errors : [],
  });
}

function defaultDetail(status) {
  if (status === 404) return 'Not found.';
  if (status === 403) return 'Your role does not allow this.';
  if (status === 401) return 'You are not signed in, or your sign-in has expired.';
  return `The gateway answered HTTP ${status}.`;
}

/**
 * One request. Returns `{ data, etag, status }`; throws ApiError on a non-2xx answer or when the
 * gateway cannot be reached (status 0).
 */
export async function request(method, path, { query, body, etag, idempotencyKey } = {}) {
  const headers = { Accept: 'application/json' };
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  if (etag) headers['If-Match'] = etag;
  if (idempotencyKey) headers['Idempotency-Key'] = idempotencyKey;
  let res;
  try {
    res = await fetch(url(path, query), {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: 'no-store',
    });
  } catch (err) {
    throw new ApiError({ status: 0, title: 'Network error', detail: `The gateway could not be reached (${err.message}).` });
  }
  if (!res.ok) {
    const problem = await problemOf(res);
    if (res.status === 401) onUnauthorized(problem);
    throw problem;
  }
  const data = res.status === 204 ? null : await res.json().catch(() => null);
  return { data, etag: res.headers.get('etag'), status: res.status };
}

export const get = async (path, query) => (await request('GET', path, { query })).data;
export const post = async (path, body, options = {}) => (await request('POST', path, { ...options, body })).data;
export const put = async (path, body) => (await request('PUT', path, { body })).data;
/** A PATCH with `If-Match: etag` (412: someone else changed it since it was read). */
export const patch = async (path, body, etag) => request('PATCH', path, { body, etag });
/** A GET that keeps the ETag, for a later patch. */
export const getWithEtag = (path) => request('GET', path);

/** One page: `{ items, next_cursor }`. */
export const page = (path, query) => get(path, query);

/** Every item of a list, following `next_cursor`, up to `max` items (`truncated` says when more were left). */
export async function all(path, query = {}, max = 1000) {
  const items = [];
  let cursor;
  do {
    const p = await get(path, { ...query, limit: 200, cursor });
    items.push(...(p.items || []));
    cursor = p.next_cursor;
  } while (cursor && items.length < max);
  return { items: items.slice(0, max), truncated: Boolean(cursor) || items.length > max };
}

/** A path segment, escaped (dead-letter ids hold a colon). */
export const seg = (value) => encodeURIComponent(value);
