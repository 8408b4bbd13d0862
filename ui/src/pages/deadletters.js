// Dead letters: records a stage could not process, with a re-drive (operators) once the cause
// is fixed. Ids, stages and reasons only.

import { useState } from 'preact/hooks';
import { newIdempotencyKey, page, post, seg } from '../api.js';
import { can } from '../auth.js';
import { ErrorBox, Notice, Page, Pager, ShortId, Time, html, missing, useLoad, usePager } from '../ui.js';

export function DeadLetters({ me }) {
  const pager = usePager();
  const list = useLoad(() => page('/dead-letters', { cursor: pager.cursor }), [pager.cursor]);
  const [error, setError] = useState(null);
  const [notice, setNotice] = useState('');
  const [busy, setBusy] = useState(null);
  const operator = can(me.role, 'operator');

  const redrive = async (d) => {
    setBusy(d.id);
    setError(null);
    setNotice('');
    try {
      await post(`/dead-letters/${seg(d.id)}/redrive`, undefined, { idempotencyKey: newIdempotencyKey() });
      setNotice(`Dead letter ${d.id} re-driven.`);
      list.reload();
    } catch (err) {
      setError(err);
    }
    setBusy(null);
  };

  return html`<${Page} title="Dead letters" actions=${html`<button type="button" onClick=${list.reload}>Refresh</button>`}>
    <${Notice} text=${notice} />
    <${ErrorBox} error=${error || (missing(list.error) ? null : list.error)} />
    ${missing(list.error) && html`<p>This gateway does not report dead letters yet.</p>`}
    ${list.data && (list.data.items.length === 0 ? html`<p>No dead letters.</p>` : html`<table aria-busy=${list.loading ? 'true' : 'false'}>
      <caption class="visually-hidden">Dead letters</caption>
      <thead><tr><th scope="col">Failed</th><th scope="col">Id</th><th scope="col">Stage</th><th scope="col">Kind</th>
        <th scope="col">Reason</th><th scope="col">Topic</th><th scope="col">Patient</th>${operator && html`<th scope="col">Action</th>`}</tr></thead>
      <tbody>${list.data.items.map((d) => html`<tr>
        <td><${Time} at=${d.failed_at} /></td><td><code>${d.id}</code></td><td>${d.stage}</td><td>${d.kind}</td><td>${d.reason}</td>
        <td><code>${d.topic}</code></td>
        <td>${d.patient_id ? html`<a href=${`#/patients/${d.patient_id}`}><${ShortId} id=${d.patient_id} /></a>` : '—'}</td>
        ${operator && html`<td>${d.redrivable === false ? html`<span class="muted">Not re-drivable</span>`
          : html`<button type="button" disabled=${busy === d.id} onClick=${() => redrive(d)}>
              Re-drive<span class="visually-hidden"> ${d.id}</span></button>`}</td>`}
      </tr>`)}</tbody>
    </table>`)}
    <${Pager} pager=${pager} page=${list.data} label="Dead letters" />
  <//>`;
}
