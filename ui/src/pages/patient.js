// One patient: connecting a provider account (the patient consents at the provider), the
// links and their latest sync runs, manual syncs, disconnecting, consents, delivery counts.

import { useState } from 'preact/hooks';
import { all, get, newIdempotencyKey, page, post, put } from '../api.js';
import { can, rememberReturn } from '../auth.js';
import { ErrorBox, Field, Notice, Page, ShortId, Status, Time, html, missing, useLoad } from '../ui.js';

const RANGES = [
  { value: '1', label: 'Last day' },
  { value: '7', label: 'Last 7 days' },
  { value: '30', label: 'Last 30 days' },
  { value: '90', label: 'Last 90 days' },
];

function Connect({ patientId }) {
  const apps = useLoad(() => all('/provider-apps'));
  const [app, setApp] = useState('');
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);
  const items = apps.data?.items || [];
  const chosen = app || items[0]?.id || '';

  const connect = async (e) => {
    e.preventDefault();
    setBusy(true);
    setError(null);
    try {
      const started = await post(`/patients/${patientId}/connect`, { provider_app_id: chosen }, { idempotencyKey: newIdempotencyKey() });
      // The provider sends the browser back to the gateway, whose page links to /ui/: come back here.
      rememberReturn(`#/patients/${patientId}`);
      location.assign(started.authorize_url);
    } catch (err) {
      setError(err);
      setBusy(false);
    }
  };

  return html`<section class="card" aria-labelledby="connect-title">
    <h2 id="connect-title">Connect a provider account</h2>
    <${ErrorBox} error=${error || apps.error} shown=${['$.provider_app_id']} />
    ${apps.data && items.length === 0 && html`<p>The organization has no provider app yet (an org admin adds one with the API).</p>`}
    ${items.length > 0 && html`<form onSubmit=${connect}>
      <${Field} label="Provider app" path="$.provider_app_id" value=${chosen} onValue=${setApp} error=${error}
        options=${items.map((a) => ({ value: a.id, label: `${a.provider} (${a.client_id})` }))}
        hint="Opens the provider's consent page: the patient signs in there and allows ohx to read their data." />
      <button type="submit" class="primary" disabled=${busy}>Connect</button>
    </form>`}
  </section>`;
}

function Runs({ link }) {
  if (!link.runs?.length) return html`<p class="muted">No sync run yet.</p>`;
  const skipped = (s) => Object.values(s || {}).reduce((n, v) => n + (Number(v) || 0), 0);
  return html`<table>
    <caption>Latest sync runs of the ${link.provider} link</caption>
    <thead><tr><th scope="col">Started</th><th scope="col">Trigger</th><th scope="col">Status</th><th scope="col">API calls</th>
      <th scope="col">Measurements</th><th scope="col">Skipped</th><th scope="col">Attempts</th><th scope="col">Error</th></tr></thead>
    <tbody>${link.runs.map((r) => html`<tr>
      <td><${Time} at=${r.started_at} /></td><td>${r.trigger}</td><td><${Status} value=${r.status} /></td>
      <td class="num">${r.api_calls}</td><td class="num">${r.measurements}</td><td class="num">${skipped(r.skipped)}</td>
      <td class="num">${r.attempts}</td><td>${r.error || '—'}</td>
    </tr>`)}</tbody>
  </table>
  <p><a href=${`#/sync-runs?link_id=${link.id}`}>All sync runs of this link</a></p>`;
}

function Links({ links, operator, onChanged }) {
  const [range, setRange] = useState('7');
  const [error, setError] = useState(null);
  const [notice, setNotice] = useState('');
  const [busy, setBusy] = useState(false);
  const act = async (fn) => {
    setBusy(true);
    setError(null);
    setNotice('');
    try {
      setNotice(await fn());
      onChanged();
    } catch (err) {
      setError(err);
    }
    setBusy(false);
  };
  const sync = (link) => act(async () => {
    const to = new Date();
    const from = new Date(to.getTime() - Number(range) * 86400000);
    const r = await post(`/links/${link.id}/sync`, { from: from.toISOString(), to: to.toISOString() }, { idempotencyKey: newIdempotencyKey() });
    return `Sync of the ${link.provider} link requested (run ${r.sync_request_id}).`;
  });
  const disconnect = (link) => {
    if (!window.confirm(`Disconnect the ${link.provider} link? It stops syncing until the patient connects again.`)) return;
    act(async () => {
      const r = await post(`/links/${link.id}/disconnect`);
      return `The ${link.provider} link is disconnected (${r.subscriptions_revoked} provider subscriptions revoked).`;
    });
  };

  return html`<section class="card" aria-labelledby="links-title">
    <h2 id="links-title">Provider links</h2>
    <${ErrorBox} error=${error} />
    <${Notice} text=${notice} />
    ${links.length === 0 ? html`<p>No provider account connected yet.</p>` : html`
      ${operator && html`<${Field} label="Manual sync range" path="sync_range" value=${range} onValue=${setRange} options=${RANGES} />`}
      <table>
        <caption class="visually-hidden">Provider links of the patient</caption>
        <thead><tr><th scope="col">Provider</th><th scope="col">Status</th><th scope="col">Reason</th><th scope="col">Last synced</th>
          ${operator && html`<th scope="col">Actions</th>`}</tr></thead>
        <tbody>${links.map((l) => html`<tr>
          <th scope="row">${l.provider}</th><td><${Status} value=${l.status} /></td><td>${l.status_reason || '—'}</td>
          <td><${Time} at=${l.last_synced_at} /></td>
          ${operator && html`<td class="buttons">
            <button type="button" disabled=${busy || l.status !== 'active'} onClick=${() => sync(l)}>Sync</button>
            <button type="button" class="danger" disabled=${busy || l.status === 'unlinked'} onClick=${() => disconnect(l)}>Disconnect</button>
          </td>`}
        </tr>`)}</tbody>
      </table>
      ${links.map((l) => html`<${Runs} link=${l} />`)}`}
  </section>`;
}

function Deliveries({ state, targetName }) {
  let body;
  if (state.error && missing(state.error)) body = html`<p class="muted">This gateway does not report deliveries yet.</p>`;
  else if (state.error) body = html`<${ErrorBox} error=${state.error} />`;
  else if (!state.data) body = html`<p class="muted">Loading…</p>`;
  else if (state.data.items.length === 0) body = html`<p>Nothing delivered yet.</p>`;
  else {
    body = html`<table>
      <caption class="visually-hidden">Deliveries of the patient's data per EHR target</caption>
      <thead><tr><th scope="col">EHR target</th><th scope="col">Delivered</th><th scope="col">Failed</th>
        <th scope="col">Last delivered</th><th scope="col">Last failed</th><th scope="col">Last rejection</th></tr></thead>
      <tbody>${state.data.items.map((d) => html`<tr>
        <th scope="row">${targetName(d.ehr_target_id)}</th>
        <td class="num">${d.delivered}</td><td class="num">${d.failed}</td>
        <td><${Time} at=${d.last_delivered_at} /></td><td><${Time} at=${d.last_failed_at} /></td>
        <td>${d.last_failure_status ? `HTTP ${d.last_failure_status}` : '—'}</td>
      </tr>`)}</tbody>
    </table>`;
  }
  return html`<section class="card" aria-labelledby="delivery-title">
    <h2 id="delivery-title">Delivery</h2>
    ${body}
  </section>`;
}

function Consents({ patientId, state, operator }) {
  const [dataType, setDataType] = useState('');
  const [granted, setGranted] = useState('true');
  const [error, setError] = useState(null);
  const record = async (type, value) => {
    setError(null);
    try {
      await put(`/patients/${patientId}/consents/${encodeURIComponent(type)}`, { granted: value });
      setDataType('');
      state.reload();
    } catch (err) {
      setError(err);
    }
  };
  return html`<section class="card" aria-labelledby="consents-title">
    <h2 id="consents-title">Consents</h2>
    <${ErrorBox} error=${error || state.error} shown=${['data_type']} />
    ${state.data && (state.data.length === 0 ? html`<p>No consent recorded.</p>` : html`<table>
      <caption class="visually-hidden">Consents of the patient per data type</caption>
      <thead><tr><th scope="col">Data type</th><th scope="col">Consent</th><th scope="col">Recorded</th>
        ${operator && html`<th scope="col">Change</th>`}</tr></thead>
      <tbody>${state.data.map((c) => html`<tr>
        <th scope="row">${c.data_type}</th><td><${Status} value=${c.granted ? 'granted' : 'refused'} /></td><td><${Time} at=${c.updated_at} /></td>
        ${operator && html`<td><button type="button" onClick=${() => record(c.data_type, !c.granted)}>
          ${c.granted ? 'Record refusal' : 'Record consent'}<span class="visually-hidden"> for ${c.data_type}</span></button></td>`}
      </tr>`)}</tbody>
    </table>`)}
    ${operator && html`<form class="inline" onSubmit=${(e) => { e.preventDefault(); record(dataType.trim(), granted === 'true'); }}>
      <${Field} label="Data type" path="data_type" value=${dataType} onValue=${setDataType} error=${error} required placeholder="weight" />
      <${Field} label="Decision" path="granted" value=${granted} onValue=${setGranted}
        options=${[{ value: 'true', label: 'Granted' }, { value: 'false', label: 'Refused' }]} />
      <button type="submit">Save consent</button>
    </form>`}
  </section>`;
}

export function PatientPage({ id, me }) {
  const patient = useLoad(() => get(`/patients/${id}`), [id]);
  const targets = useLoad(() => all('/ehr-targets'));
  const links = useLoad(async () => {
    const { items } = await all('/links', { patient_id: id });
    const runs = await Promise.all(items.map((l) => page('/sync-runs', { link_id: l.id, limit: 5 }).then((p) => p.items)));
    return items.map((l, i) => ({ ...l, runs: runs[i] }));
  }, [id]);
  const deliveries = useLoad(() => all('/delivery-status', { patient_id: id }), [id]);
  const consents = useLoad(() => get(`/patients/${id}/consents`), [id]);
  const operator = can(me.role, 'operator');
  const names = new Map((targets.data?.items || []).map((t) => [t.id, t.name]));
  const targetName = (tid) => names.get(tid) ?? tid;
  const refresh = () => [patient, links, deliveries, consents].forEach((s) => s.reload());
  const p = patient.data;

  const busy = [patient, links, deliveries, consents].some((s) => s.loading);
  return html`<${Page} title=${p ? `Patient ${p.ehr_patient_reference}` : 'Patient'} busy=${busy}
      actions=${html`<button type="button" onClick=${refresh}>Refresh</button>`}>
    <p><a href="#/patients">All patients</a></p>
    <${ErrorBox} error=${patient.error || links.error} />
    ${p && html`<dl class="facts card">
      <dt>Reference</dt><dd>${p.ehr_patient_reference}</dd>
      <dt>EHR target</dt><dd>${targetName(p.ehr_target_id)}</dd>
      <dt>Id</dt><dd><${ShortId} id=${p.id} /></dd>
      <dt>Added</dt><dd><${Time} at=${p.created_at} /></dd>
    </dl>`}
    ${p && operator && html`<${Connect} patientId=${id} />`}
    ${links.data && html`<${Links} links=${links.data} operator=${operator} onChanged=${links.reload} />`}
    ${p && html`<${Deliveries} state=${deliveries} targetName=${targetName} />`}
    ${p && html`<${Consents} patientId=${id} state=${consents} operator=${operator} />`}
  <//>`;
}
