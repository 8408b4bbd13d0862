// Overview: links by status, the latest sync run, delivery failures, dead letters and the
// circuit breaker of each EHR target. Counts only, never health values.

import { all, get, page } from '../api.js';
import { ErrorBox, Page, ShortId, Status, Time, html, missing, useLoad } from '../ui.js';

const LINK_STATUSES = ['active', 'reauth_required', 'disabled', 'unlinked'];

/** A section that loads on its own: one failing endpoint does not hide the others. */
function Section({ title, state, children, notAvailable }) {
  const id = `s-${title.replace(/\W+/g, '-').toLowerCase()}`;
  let body;
  if (state.error && missing(state.error) && notAvailable) body = html`<p class="muted">${notAvailable}</p>`;
  else if (state.error) body = html`<${ErrorBox} error=${state.error} />`;
  else if (!state.data) body = html`<p class="muted">Loading…</p>`;
  else body = children(state.data);
  return html`<section class="card" aria-labelledby=${id} aria-busy=${state.loading ? 'true' : 'false'}>
    <h2 id=${id}>${title}</h2>
    ${body}
  </section>`;
}

const faultText = (f) => (typeof f === 'string' ? f : f?.kind || f?.name || f?.fault || JSON.stringify(f));

export function Overview() {
  const links = useLoad(() => all('/links', {}, 10000));
  const lastRun = useLoad(async () => {
    const { items } = await page('/sync-runs', { limit: 1 });
    if (!items.length) return { items };
    // Name the link by its patient and provider.
    const link = await get(`/links/${items[0].link_id}`).catch(() => null);
    const patient = link && (await get(`/patients/${link.patient_id}`).catch(() => null));
    return { items, link, patient };
  });
  const deliveries = useLoad(() => all('/delivery-status', {}, 5000));
  const dead = useLoad(() => all('/dead-letters', {}, 10000));
  const targets = useLoad(async () => {
    const { items } = await all('/ehr-targets');
    const statuses = await Promise.all(items.map((t) => get(`/ehr-targets/${t.id}/status`).catch((error) => ({ error }))));
    return items.map((t, i) => ({ ...t, status: statuses[i] }));
  });
  const targetNames = new Map((targets.data || []).map((t) => [t.id, t.name]));
  const refresh = () => [links, lastRun, deliveries, dead, targets].forEach((s) => s.reload());

  return html`<${Page} title="Overview" actions=${html`<button type="button" onClick=${refresh}>Refresh</button>`}>
    <div class="grid">
      <${Section} title="Links by status" state=${links}>${({ items, truncated }) => html`
        <table>
          <caption class="visually-hidden">Number of provider links per status</caption>
          <thead><tr><th scope="col">Status</th><th scope="col">Links</th></tr></thead>
          <tbody>${LINK_STATUSES.map((s) => html`<tr>
            <th scope="row"><${Status} value=${s} /></th>
            <td class="num">${items.filter((l) => l.status === s).length}${truncated ? '+' : ''}</td>
          </tr>`)}</tbody>
        </table>`}
      <//>

      <${Section} title="Last sync" state=${lastRun}>${({ items, link, patient }) => (items.length === 0
        ? html`<p>No sync has run yet.</p>`
        : html`<dl class="facts">
            <dt>Status</dt><dd><${Status} value=${items[0].status} /></dd>
            <dt>Started</dt><dd><${Time} at=${items[0].started_at} /></dd>
            <dt>Finished</dt><dd><${Time} at=${items[0].finished_at} /></dd>
            <dt>Measurements</dt><dd>${items[0].measurements}</dd>
            <dt>Link</dt><dd>${link && patient
              ? html`<a href=${`#/patients/${patient.id}`}>${patient.ehr_patient_reference}</a> · ${link.provider}`
              : html`<a href=${`#/sync-runs?link_id=${items[0].link_id}`}><${ShortId} id=${items[0].link_id} /></a>`}</dd>
          </dl>`)}
      <//>

      <${Section} title="Dead letters" state=${dead} notAvailable="This gateway does not report dead letters yet.">${({ items, truncated }) => html`
        <p><span class="big">${items.length}${truncated ? '+' : ''}</span> waiting for a re-drive.</p>
        <p><a href="#/dead-letters">Review dead letters</a></p>`}
      <//>
    </div>

    <${Section} title="Delivery failures" state=${deliveries} notAvailable="This gateway does not report deliveries yet.">${({ items }) => {
      const failing = items.filter((d) => d.failed > 0);
      const sum = (k) => items.reduce((n, d) => n + (d[k] || 0), 0);
      return html`<p>${sum('delivered')} delivered, ${sum('failed')} failed.</p>
        ${failing.length === 0 ? html`<p>No delivery failures.</p>` : html`<table>
          <caption class="visually-hidden">Patients with failed deliveries</caption>
          <thead><tr><th scope="col">Patient</th><th scope="col">EHR target</th><th scope="col">Failed</th>
            <th scope="col">Last failed</th><th scope="col">Last rejection</th></tr></thead>
          <tbody>${failing.map((d) => html`<tr>
            <td><a href=${`#/patients/${d.patient_id}`}><${ShortId} id=${d.patient_id} /></a></td>
            <td>${targetNames.get(d.ehr_target_id) ?? html`<${ShortId} id=${d.ehr_target_id} />`}</td>
            <td class="num">${d.failed}</td>
            <td><${Time} at=${d.last_failed_at} /></td>
            <td>${d.last_failure_status ? `HTTP ${d.last_failure_status}` : '—'}</td>
          </tr>`)}</tbody>
        </table>`}`;
    }}<//>

    <${Section} title="EHR targets" state=${targets}>${(items) => (items.length === 0
      ? html`<p>No EHR target yet. <a href="#/targets">Add one</a>.</p>`
      : html`<table>
          <caption class="visually-hidden">Circuit breaker per EHR target</caption>
          <thead><tr><th scope="col">Target</th><th scope="col">Circuit breaker</th><th scope="col">Held</th><th scope="col">Faults</th></tr></thead>
          <tbody>${items.map((t) => html`<tr>
            <th scope="row">${t.name}</th>
            <td><${Status} value=${t.status.error ? 'unknown' : t.status.breaker} /></td>
            <td class="num">${t.status.error ? '—' : t.status.held ?? 0}</td>
            <td>${t.status.error ? '—' : (t.status.faults || []).map(faultText).join(', ') || 'none'}</td>
          </tr>`)}</tbody>
        </table>`)}
    <//>
  <//>`;
}
