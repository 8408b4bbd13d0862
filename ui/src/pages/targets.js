// EHR targets: where the organization's FHIR resources go. Listing, adding, editing (with
// If-Match: a concurrent edit is refused with 412), testing the connection. Secrets are
// write-only: the form sends them, the API never returns them.

import { useEffect, useRef, useState } from 'preact/hooks';
import { all, get, getWithEtag, patch, post } from '../api.js';
import { can } from '../auth.js';
import { ErrorBox, Field, Notice, Page, Status, html, missing, useLoad } from '../ui.js';

const KINDS = [
  { value: 'none', label: 'None' },
  { value: 'bearer', label: 'Bearer token' },
  { value: 'client_credentials', label: 'OAuth2 client credentials' },
  { value: 'smart_backend', label: 'SMART Backend Services' },
];
const FIELDS = ['$.name', '$.base_url', '$.fhir_version', '$.upsert_mode', '$.auth.kind', '$.auth.secret',
  '$.auth.client_id', '$.auth.token_url', '$.auth.scope', '$.auth.client_auth'];

const blank = { name: '', base_url: '', fhir_version: 'R5', upsert_mode: 'put', kind: 'none', client_id: '', token_url: '', scope: '', client_auth: 'basic', secret: '' };

function fromTarget(t) {
  const a = t.auth || {};
  return { ...blank, name: t.name, base_url: t.base_url, fhir_version: t.fhir_version, upsert_mode: t.upsert_mode,
    kind: a.kind, client_id: a.client_id || '', token_url: a.token_url || '', scope: a.scope || '', client_auth: a.client_auth || 'basic', secretSet: a.secret_set };
}

/** The API's body: only the fields of the chosen kind, optional ones only when filled in. */
function toBody(v) {
  const auth = { kind: v.kind };
  const opt = (k) => { if (v[k].trim()) auth[k] = v[k].trim(); };
  if (v.kind === 'client_credentials' || v.kind === 'smart_backend') {
    auth.client_id = v.client_id.trim();
    opt('token_url');
    opt('scope');
  }
  if (v.kind === 'client_credentials') auth.client_auth = v.client_auth;
  if ((v.kind === 'bearer' || v.kind === 'client_credentials') && v.secret) auth.secret = v.secret;
  return { name: v.name.trim(), base_url: v.base_url.trim(), fhir_version: v.fhir_version, upsert_mode: v.upsert_mode, auth };
}

function TargetForm({ target, onDone, onCancel }) {
  const editing = Boolean(target);
  const [v, setV] = useState(editing ? fromTarget(target.data) : blank);
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);
  const form = useRef(null);
  useEffect(() => form.current?.querySelector('input')?.focus(), []);
  const set = (k) => (value) => setV((old) => ({ ...old, [k]: value }));
  const oauth = v.kind === 'client_credentials' || v.kind === 'smart_backend';
  const secretLabel = v.kind === 'bearer' ? 'Bearer token' : 'Client secret';
  const keep = editing && v.secretSet ? ' Leave empty to keep the stored one.' : '';

  const submit = async (e) => {
    e.preventDefault();
    setBusy(true);
    setError(null);
    try {
      const saved = editing ? (await patch(`/ehr-targets/${target.data.id}`, toBody(v), target.etag)).data : await post('/ehr-targets', toBody(v));
      onDone(saved);
    } catch (err) {
      if (err.status === 412) err.detail = 'Someone else changed this target since you opened it: cancel, then edit it again.';
      setError(err);
      setBusy(false);
    }
  };

  return html`<form class="card" ref=${form} onSubmit=${submit} aria-labelledby="target-form-title">
    <h2 id="target-form-title">${editing ? `Edit ${target.data.name}` : 'New EHR target'}</h2>
    <${ErrorBox} error=${error} shown=${FIELDS} />
    <${Field} label="Name" path="$.name" value=${v.name} onValue=${set('name')} error=${error} required />
    <${Field} label="Base URL" path="$.base_url" type="url" value=${v.base_url} onValue=${set('base_url')} error=${error} required
      placeholder="https://ehr.example/fhir" hint="The FHIR server's base URL." />
    <${Field} label="FHIR version" path="$.fhir_version" value=${v.fhir_version} onValue=${set('fhir_version')} error=${error}
      options=${[{ value: 'R4', label: 'R4' }, { value: 'R5', label: 'R5' }]} />
    <${Field} label="Write mode" path="$.upsert_mode" value=${v.upsert_mode} onValue=${set('upsert_mode')} error=${error}
      options=${[{ value: 'put', label: 'PUT with ohx ids' }, { value: 'conditional', label: 'Conditional PUT by identifier' }]} />
    <fieldset>
      <legend>Authentication</legend>
      <${Field} label="Authentication" path="$.auth.kind" value=${v.kind} onValue=${set('kind')} error=${error} options=${KINDS} />
      ${oauth && html`
        <${Field} label="Client id" path="$.auth.client_id" value=${v.client_id} onValue=${set('client_id')} error=${error} required />
        <${Field} label="Token URL" path="$.auth.token_url" type="url" value=${v.token_url} onValue=${set('token_url')} error=${error}
          required=${v.kind === 'client_credentials'} hint=${v.kind === 'smart_backend' ? 'Optional: discovered from the server when empty.' : ''} />
        <${Field} label="Scope" path="$.auth.scope" value=${v.scope} onValue=${set('scope')} error=${error}
          hint="Optional, space-separated; default: what ohx writes." />`}
      ${v.kind === 'client_credentials' && html`<${Field} label="Client authentication" path="$.auth.client_auth" value=${v.client_auth}
          onValue=${set('client_auth')} error=${error} options=${[{ value: 'basic', label: 'HTTP Basic' }, { value: 'post', label: 'In the form body' }]} />`}
      ${(v.kind === 'bearer' || v.kind === 'client_credentials') && html`<${Field} label=${secretLabel} path="$.auth.secret" type="password"
          value=${v.secret} onValue=${set('secret')} error=${error} required=${!keep} autocomplete="new-password"
          hint=${`Write-only: stored sealed, never shown again.${keep}`} />`}
    </fieldset>
    <div class="buttons">
      <button type="submit" class="primary" disabled=${busy}>${editing ? 'Save changes' : 'Save target'}</button>
      <button type="button" onClick=${onCancel}>Cancel</button>
    </div>
  </form>`;
}

function TestResult({ result }) {
  if (!result) return null;
  if (result.error) {
    return missing(result.error) ? html`<span>This gateway cannot test connections yet.</span>` : html`<span class="bad">${result.error.detail}</span>`;
  }
  const r = result.data;
  const said = r.detail || (r.fhir_version ? `FHIR ${r.fhir_version}` : '');
  return html`<span class=${r.ok ? 'good' : 'bad'}>${r.ok ? 'Reachable' : 'Failed'}${r.http_status ? ` (HTTP ${r.http_status})` : ''}${said ? `: ${said}` : ''}</span>`;
}

export function Targets({ me }) {
  const list = useLoad(async () => {
    const { items } = await all('/ehr-targets');
    const statuses = await Promise.all(items.map((t) => get(`/ehr-targets/${t.id}/status`).catch(() => null)));
    return items.map((t, i) => ({ ...t, breaker: statuses[i]?.breaker ?? 'unknown' }));
  });
  const [form, setForm] = useState(null); // null | { target?: { data, etag } }
  const [tests, setTests] = useState({});
  const [error, setError] = useState(null);
  const [notice, setNotice] = useState('');
  const admin = can(me.role, 'org_admin');
  const operator = can(me.role, 'operator');

  const edit = async (t) => {
    setError(null);
    try {
      setForm({ target: await getWithEtag(`/ehr-targets/${t.id}`) });
    } catch (err) {
      setError(err);
    }
  };
  const test = async (t) => {
    setTests((s) => ({ ...s, [t.id]: { pending: true } }));
    const result = await post(`/ehr-targets/${t.id}/test`).then((data) => ({ data }), (err) => ({ error: err }));
    setTests((s) => ({ ...s, [t.id]: result }));
  };
  const done = (saved) => {
    setForm(null);
    setNotice(`EHR target ${saved.name} saved.`);
    list.reload();
  };

  return html`<${Page} title="EHR targets" actions=${admin && !form
    && html`<button type="button" class="primary" onClick=${() => setForm({})}>Add target</button>`}>
    <${Notice} text=${notice} />
    ${form && html`<${TargetForm} key=${form.target?.data.id || 'new'} target=${form.target} onDone=${done} onCancel=${() => setForm(null)} />`}
    <${ErrorBox} error=${error || list.error} />
    ${list.data && (list.data.length === 0 ? html`<p>No EHR target yet.</p>` : html`<table>
      <caption class="visually-hidden">EHR targets</caption>
      <thead><tr><th scope="col">Name</th><th scope="col">Base URL</th><th scope="col">FHIR</th><th scope="col">Authentication</th>
        <th scope="col">Circuit breaker</th>${operator && html`<th scope="col">Actions</th>`}</tr></thead>
      <tbody>${list.data.map((t) => html`<tr>
        <th scope="row">${t.name}</th><td><code>${t.base_url}</code></td><td>${t.fhir_version}</td>
        <td>${KINDS.find((k) => k.value === t.auth.kind)?.label ?? t.auth.kind}${t.auth.secret_set ? ' (secret set)' : ''}
          ${t.jwks_path && html`<br /><small>JWKS to register at the EHR: <code>${t.jwks_path}</code></small>`}</td>
        <td><${Status} value=${t.breaker} /></td>
        ${operator && html`<td class="buttons">
          <button type="button" disabled=${tests[t.id]?.pending} onClick=${() => test(t)}>Test connection<span class="visually-hidden"> to ${t.name}</span></button>
          ${admin && html`<button type="button" onClick=${() => edit(t)}>Edit<span class="visually-hidden"> ${t.name}</span></button>`}
          <div role="status" aria-live="polite"><${TestResult} result=${tests[t.id]?.pending ? null : tests[t.id]} /></div>
        </td>`}
      </tr>`)}</tbody>
    </table>`)}
  <//>`;
}
