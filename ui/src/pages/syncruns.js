// Sync runs, newest first: status, counts and errors (never values), by link and status.

import { all, page } from '../api.js';
import { ErrorBox, Field, Page, Pager, ShortId, Status, Time, html, useLoad, usePager } from '../ui.js';

const STATUSES = ['', 'ok', 'succeeded', 'failed', 'reauth_required', 'skipped'];

export function SyncRuns({ query }) {
  const linkId = query.get('link_id') || '';
  const status = query.get('status') || '';
  const pager = usePager();
  const runs = useLoad(() => page('/sync-runs', { link_id: linkId, status, cursor: pager.cursor }), [linkId, status, pager.cursor]);
  // To name a link by its provider and patient (the first 1000 of each).
  const names = useLoad(async () => {
    const [links, patients] = await Promise.all([all('/links'), all('/patients')]);
    const refs = new Map(patients.items.map((p) => [p.id, p.ehr_patient_reference]));
    return new Map(links.items.map((l) => [l.id, { provider: l.provider, patient: l.patient_id, ref: refs.get(l.patient_id) }]));
  });
  const setFilter = (k) => (v) => {
    const q = new URLSearchParams(query);
    if (v) q.set(k, v); else q.delete(k);
    pager.first();
    location.hash = `#/sync-runs${q.toString() ? `?${q}` : ''}`;
  };
  const linkLabel = (id) => {
    const n = names.data?.get(id);
    return n ? html`<a href=${`#/patients/${n.patient}`}>${n.ref ?? 'patient'}</a> · ${n.provider}` : html`<${ShortId} id=${id} />`;
  };

  return html`<${Page} title="Sync runs" actions=${html`<button type="button" onClick=${runs.reload}>Refresh</button>`}>
    <form class="inline filters" onSubmit=${(e) => e.preventDefault()}>
      <${Field} label="Status" path="status" value=${status} onValue=${setFilter('status')}
        options=${STATUSES.map((s) => ({ value: s, label: s || 'Any' }))} />
      ${linkId && html`<p>Link ${linkLabel(linkId)} <button type="button" onClick=${() => setFilter('link_id')('')}>Show all links</button></p>`}
    </form>
    <${ErrorBox} error=${runs.error} />
    ${runs.data && (runs.data.items.length === 0 ? html`<p>No sync runs.</p>` : html`<table aria-busy=${runs.loading ? 'true' : 'false'}>
      <caption class="visually-hidden">Sync runs, newest first</caption>
      <thead><tr><th scope="col">Started</th><th scope="col">Link</th><th scope="col">Trigger</th><th scope="col">Status</th>
        <th scope="col">API calls</th><th scope="col">Measurements</th><th scope="col">Attempts</th><th scope="col">Finished</th><th scope="col">Error</th></tr></thead>
      <tbody>${runs.data.items.map((r) => html`<tr>
        <td><${Time} at=${r.started_at} /></td><td>${linkLabel(r.link_id)}</td><td>${r.trigger}</td><td><${Status} value=${r.status} /></td>
        <td class="num">${r.api_calls}</td><td class="num">${r.measurements}</td><td class="num">${r.attempts}</td>
        <td><${Time} at=${r.finished_at} /></td><td>${r.error || '—'}</td>
      </tr>`)}</tbody>
    </table>`)}
    <${Pager} pager=${pager} page=${runs.data} label="Sync runs" />
  <//>`;
}
