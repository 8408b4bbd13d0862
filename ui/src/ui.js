// Shared pieces of the pages: htm bound to Preact, data loading, page frame, error display,
// labelled form fields, dates, statuses and paging.

import { h } from 'preact';
import { useEffect, useRef, useState } from 'preact/hooks';
import htm from 'htm';

export const html = htm.bind(h);

/**
 * Runs `load` now and whenever `deps` change or `reload()` is called: `{ data, error, loading, reload }`.
 * The previous data stays while reloading (no flicker on refresh).
 */
export function useLoad(load, deps = []) {
  const [state, setState] = useState({ loading: true });
  const [tick, setTick] = useState(0);
  useEffect(() => {
    let live = true;
    setState((s) => ({ ...s, loading: true }));
    load().then(
      (data) => live && setState({ data, loading: false }),
      (error) => live && setState((s) => ({ data: s.data, error, loading: false })),
    );
    return () => { live = false; };
  }, [...deps, tick]);
  return { ...state, reload: () => setTick((t) => t + 1) };
}

/** A page: its heading gets the focus when the page opens (screen readers announce it); `busy` while loading. */
export function Page({ title, children, actions, busy = false }) {
  const heading = useRef(null);
  useEffect(() => {
    document.title = `${title} · ohx`;
    heading.current?.focus();
  }, [title]);
  return html`<section class="page" aria-labelledby="page-title" aria-busy=${busy ? 'true' : 'false'}>
    <div class="page-head">
      <h1 id="page-title" tabindex="-1" ref=${heading}>${title}</h1>
      ${actions && html`<div class="page-actions">${actions}</div>`}
    </div>
    ${children}
  </section>`;
}

/**
 * Where errors appear: always in the page (an aria-live region), filled when `error` is set. An
 * ApiError shows its `detail`, the field errors not shown next to a field (`shown`: the JSON paths
 * the form displays itself) and, small, the request id for support.
 */
export function ErrorBox({ error, shown = [] }) {
  const rest = error?.errors?.filter((e) => !shown.includes(e.field)) ?? [];
  return html`<div class="error-region" aria-live="assertive" aria-atomic="true">
    ${error && html`<div class="error" role="alert">
      <p><strong>${error.title && error.status ? `${error.title}: ` : ''}</strong>${error.detail || error.message}</p>
      ${rest.length > 0 && html`<ul>${rest.map((e) => html`<li><code>${e.field}</code>: ${e.message}</li>`)}</ul>`}
      ${error.requestId && html`<p class="request-id">Request id: <code>${error.requestId}</code></p>`}
    </div>`}
  </div>`;
}

/** A polite announcement (success messages). */
export function Notice({ text }) {
  return html`<div class="notice-region" role="status" aria-live="polite">${text && html`<p class="notice">${text}</p>`}</div>`;
}

const idOf = (path) => `f${path.replace(/[^A-Za-z0-9]+/g, '-')}`;

/**
 * A labelled input or select. `path` is the JSON path the API names in its field errors
 * (`$.base_url`); the error of that field appears under it, linked with aria-describedby.
 */
export function Field({ label, path, error, hint, type = 'text', options, value, onValue, required, autocomplete, placeholder }) {
  const id = idOf(path);
  const message = error?.fields?.get(path);
  const describedBy = [hint && `${id}-hint`, message && `${id}-error`].filter(Boolean).join(' ') || undefined;
  const common = {
    id,
    name: path,
    required,
    'aria-describedby': describedBy,
    'aria-invalid': message ? 'true' : undefined,
  };
  const control = options
    ? html`<select ...${common} value=${value} onChange=${(e) => onValue(e.currentTarget.value)}>
        ${options.map((o) => html`<option value=${o.value}>${o.label}</option>`)}
      </select>`
    : html`<input ...${common} type=${type} value=${value} placeholder=${placeholder}
        autocomplete=${autocomplete || 'off'} onInput=${(e) => onValue(e.currentTarget.value)} />`;
  return html`<div class=${`field${message ? ' invalid' : ''}`}>
    <label for=${id}>${label}${required ? html` <span aria-hidden="true">*</span>` : ''}</label>
    ${hint && html`<p id=${`${id}-hint`} class="hint">${hint}</p>`}
    ${control}
    ${message && html`<p id=${`${id}-error`} class="field-error">${message}</p>`}
  </div>`;
}

/** A date and time, in the browser's locale; "—" when absent. */
export function Time({ at }) {
  if (!at) return '—';
  const d = new Date(at);
  return html`<time datetime=${at} title=${at}>${d.toLocaleString()}</time>`;
}

/** A status word with a colour (the word itself carries the meaning). */
export const Status = ({ value }) => html`<span class=${`status status-${String(value).replace(/[^a-z_]/g, '')}`}>${value}</span>`;

/**
 * Cursor paging of a list: `{ cursor, next(nextCursor), first(), index }`; the page's loader
 * passes `cursor` to the API.
 */
export function usePager() {
  const [stack, setStack] = useState([undefined]);
  return {
    cursor: stack[stack.length - 1],
    index: stack.length,
    next: (c) => setStack((s) => [...s, c]),
    back: () => setStack((s) => (s.length > 1 ? s.slice(0, -1) : s)),
    first: () => setStack([undefined]),
  };
}

/** "Previous / Next page" buttons for a page of `{ items, next_cursor }`. */
export function Pager({ pager, page, label }) {
  if (!page || (pager.index === 1 && !page.next_cursor)) return null;
  return html`<nav class="pager" aria-label=${`${label} pages`}>
    <button type="button" disabled=${pager.index === 1} onClick=${pager.back}>Previous page</button>
    <span>Page ${pager.index}</span>
    <button type="button" disabled=${!page.next_cursor} onClick=${() => pager.next(page.next_cursor)}>Next page</button>
  </nav>`;
}

/** A short id for tables (the full one in its title). */
export const ShortId = ({ id }) => html`<code title=${id}>${String(id).slice(0, 8)}</code>`;

/** Whether an error is a 404 of an endpoint this gateway does not have yet. */
export const missing = (error) => error?.status === 404;
