// Patients: the list, and adding one (an EHR target and the patient's reference there).

import { useEffect, useRef, useState } from 'preact/hooks';
import { all, page, post } from '../api.js';
import { can } from '../auth.js';
import { ErrorBox, Field, Page, Pager, Time, html, useLoad, usePager } from '../ui.js';

function AddPatient({ targets, onDone, onCancel }) {
  const [target, setTarget] = useState(targets[0]?.id ?? '');
  const [reference, setReference] = useState('');
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);
  const form = useRef(null);
  useEffect(() => form.current?.querySelector('select, input')?.focus(), []);

  const submit = async (e) => {
    e.preventDefault();
    setBusy(true);
    setError(null);
    try {
      const created = await post('/patients', { ehr_target_id: target, ehr_patient_reference: reference.trim() });
      onDone(created);
    } catch (err) {
      setError(err);
      setBusy(false);
    }
  };

  if (targets.length === 0) {
    return html`<p class="card">Add an <a href="#/targets">EHR target</a> first: a patient belongs to one.</p>`;
  }
  return html`<form class="card" ref=${form} onSubmit=${submit} aria-labelledby="add-patient-title">
    <h2 id="add-patient-title">New patient</h2>
    <${ErrorBox} error=${error} shown=${['$.ehr_target_id', '$.ehr_patient_reference']} />
    <${Field} label="EHR target" path="$.ehr_target_id" value=${target} onValue=${setTarget} error=${error} required
      options=${targets.map((t) => ({ value: t.id, label: t.name }))} />
    <${Field} label="Patient reference" path="$.ehr_patient_reference" value=${reference} onValue=${setReference}
      error=${error} required placeholder="Patient/123" hint="The patient as that EHR knows them: Patient/ and the EHR's id." />
    <div class="buttons">
      <button type="submit" class="primary" disabled=${busy}>Save patient</button>
      <button type="button" onClick=${onCancel}>Cancel</button>
    </div>
  </form>`;
}

export function Patients({ me }) {
  const pager = usePager();
  const list = useLoad(() => page('/patients', { cursor: pager.cursor }), [pager.cursor]);
  const targets = useLoad(() => all('/ehr-targets'));
  const [adding, setAdding] = useState(false);
  const names = new Map((targets.data?.items || []).map((t) => [t.id, t.name]));
  const admin = can(me.role, 'org_admin');

  return html`<${Page} title="Patients" actions=${admin && !adding
    && html`<button type="button" class="primary" onClick=${() => setAdding(true)}>Add patient</button>`}>
    ${adding && targets.data && html`<${AddPatient} targets=${targets.data.items}
      onCancel=${() => setAdding(false)}
      onDone=${(p) => { location.hash = `#/patients/${p.id}`; }} />`}
    <${ErrorBox} error=${list.error || targets.error} />
    ${list.data && (list.data.items.length === 0
      ? html`<p>No patients yet.</p>`
      : html`<table aria-busy=${list.loading ? 'true' : 'false'}>
          <caption class="visually-hidden">Patients</caption>
          <thead><tr><th scope="col">Patient reference</th><th scope="col">EHR target</th><th scope="col">Added</th></tr></thead>
          <tbody>${list.data.items.map((p) => html`<tr>
            <th scope="row"><a href=${`#/patients/${p.id}`}>${p.ehr_patient_reference}</a></th>
            <td>${names.get(p.ehr_target_id) ?? p.ehr_target_id}</td>
            <td><${Time} at=${p.created_at} /></td>
          </tr>`)}</tbody>
        </table>`)}
    <${Pager} pager=${pager} page=${list.data} label="Patients" />
  <//>`;
}
