// Organizations: what a platform admin manages (everything else belongs to an organization).

import { useState } from 'preact/hooks';
import { page, post } from '../api.js';
import { can } from '../auth.js';
import { ErrorBox, Field, Notice, Page, Pager, ShortId, Time, html, useLoad, usePager } from '../ui.js';

export function Organizations({ me }) {
  const pager = usePager();
  const list = useLoad(() => page('/organizations', { cursor: pager.cursor }), [pager.cursor]);
  const [name, setName] = useState('');
  const [error, setError] = useState(null);
  const [notice, setNotice] = useState('');

  const add = async (e) => {
    e.preventDefault();
    setError(null);
    try {
      const org = await post('/organizations', { name: name.trim() });
      setName('');
      setNotice(`Organization ${org.name} added (id ${org.id}).`);
      list.reload();
    } catch (err) {
      setError(err);
    }
  };

  return html`<${Page} title="Organizations">
    <${Notice} text=${notice} />
    ${can(me.role, 'platform_admin') && html`<form class="card inline" onSubmit=${add} aria-labelledby="org-form-title">
      <h2 id="org-form-title">New organization</h2>
      <${ErrorBox} error=${error} shown=${['$.name']} />
      <${Field} label="Name" path="$.name" value=${name} onValue=${setName} error=${error} required />
      <button type="submit" class="primary">Add organization</button>
    </form>`}
    <${ErrorBox} error=${list.error} />
    ${list.data && html`<table>
      <caption class="visually-hidden">Organizations</caption>
      <thead><tr><th scope="col">Name</th><th scope="col">Id</th><th scope="col">Added</th></tr></thead>
      <tbody>${list.data.items.map((o) => html`<tr>
        <th scope="row">${o.name}</th><td><${ShortId} id=${o.id} /></td><td><${Time} at=${o.created_at} /></td>
      </tr>`)}</tbody>
    </table>`}
    <${Pager} pager=${pager} page=${list.data} label="Organizations" />
  <//>`;
}
