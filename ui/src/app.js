// The application: who is signed in, the navigation, and a router on the location hash
// (#/patients/<id>?…): the gateway serves one index.html at /ui/, every page lives behind it.

import { useEffect, useRef, useState } from 'preact/hooks';
import { configure } from './api.js';
import { can, currentSession, signOut, whoAmI } from './auth.js';
import { DeadLetters } from './pages/deadletters.js';
import { Organizations } from './pages/organizations.js';
import { Overview } from './pages/overview.js';
import { PatientPage } from './pages/patient.js';
import { Patients } from './pages/patients.js';
import { SignIn } from './pages/signin.js';
import { SyncRuns } from './pages/syncruns.js';
import { Targets } from './pages/targets.js';
import { Page, html } from './ui.js';

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

function parseHash() {
  const [path, q] = location.hash.replace(/^#/, '').split('?');
  return { parts: path.split('/').filter(Boolean), query: new URLSearchParams(q || '') };
}

const ORG_PAGES = [
  { href: '#/overview', label: 'Overview', key: 'overview' },
  { href: '#/patients', label: 'Patients', key: 'patients' },
  { href: '#/targets', label: 'EHR targets', key: 'targets' },
  { href: '#/sync-runs', label: 'Sync runs', key: 'sync-runs' },
  { href: '#/dead-letters', label: 'Dead letters', key: 'dead-letters' },
];
const PLATFORM_PAGES = [{ href: '#/organizations', label: 'Organizations', key: 'organizations' }];

function route({ parts, query }, me) {
  const orgless = !me.organization_id && me.source !== 'unknown';
  const [page, id] = parts;
  if (orgless || page === 'organizations') return html`<${Organizations} me=${me} />`;
  switch (page) {
    case 'patients':
      if (!id) return html`<${Patients} me=${me} />`;
      if (!UUID.test(id)) return html`<${Page} title="Not found"><p>No patient has the id ${id}.</p><//>`;
      return html`<${PatientPage} key=${id} id=${id} me=${me} />`;
    case 'targets': return html`<${Targets} me=${me} />`;
    case 'sync-runs': return html`<${SyncRuns} query=${query} />`;
    case 'dead-letters': return html`<${DeadLetters} me=${me} />`;
    default: return html`<${Overview} me=${me} />`;
  }
}

function Nav({ pages, current }) {
  return html`<nav aria-label="Main">
    <ul>${pages.map((p) => html`<li>
      <a href=${p.href} aria-current=${current === p.key ? 'page' : undefined}>${p.label}</a>
    </li>`)}</ul>
  </nav>`;
}

export function App({ config, error: initialError }) {
  const [session, setSession] = useState(currentSession);
  const [me, setMe] = useState(null);
  const [error, setError] = useState(initialError);
  const [where, setWhere] = useState(parseHash);
  const signedIn = useRef(false); // a 401 after signing in means the session ended
  const [leaving, setLeaving] = useState(false);

  useEffect(() => {
    const onHash = () => setWhere(parseHash());
    addEventListener('hashchange', onHash);
    return () => removeEventListener('hashchange', onHash);
  }, []);

  useEffect(() => {
    configure({
      token: session?.token ?? null,
      onUnauthorized: (problem) => {
        if (!signedIn.current) return; // refused at sign-in: whoAmI's failure says why
        signedIn.current = false;
        signOut(null);
        setMe(null);
        setSession(null);
        setError({ ...problem, detail: `You are signed out: ${problem.detail}` });
      },
    });
    if (!session) return;
    whoAmI(session).then((who) => { signedIn.current = true; setMe(who); setError(null); }, (err) => {
      signOut(null);
      setSession(null);
      setError(err);
    });
  }, [session]);

  if (leaving) return html`<${Shell}><p role="status">Signing out…</p><//>`;
  if (!session) {
    return html`<${Shell}><${SignIn} config=${config} error=${error} onSession=${setSession} /><//>`;
  }
  if (!me) return html`<${Shell}><p role="status">Signing in…</p><//>`;

  const orgless = !me.organization_id && me.source !== 'unknown';
  const pages = orgless ? PLATFORM_PAGES : [...ORG_PAGES, ...(can(me.role, 'platform_admin') ? PLATFORM_PAGES : [])];
  const out = async () => {
    signedIn.current = false;
    setLeaving(true);
    if (await signOut(config.oidc)) return; // on the way to the issuer's logout page
    setLeaving(false);
    setMe(null);
    setSession(null);
  };
  const account = html`<div class="account">
    <span>${me.actor} · <strong>${me.role.replace('_', ' ')}</strong>${me.source === 'unknown' ? ' (role unknown: read-only)' : ''}</span>
    <button type="button" onClick=${out}>Sign out</button>
  </div>`;
  return html`<${Shell} account=${account} nav=${html`<${Nav} pages=${pages} current=${where.parts[0] || 'overview'} />`}>
    ${route(where, me)}
  <//>`;
}

function Shell({ account, nav, children }) {
  return html`<a class="skip" href="#main" onClick=${(e) => { e.preventDefault(); document.getElementById('main')?.focus(); }}>Skip to content</a>
    <header class="top">
      <p class="brand"><a href="#/overview">ohx</a> <span>configuration</span></p>
      ${nav}
      ${account}
    </header>
    <main id="main" tabindex="-1">${children}</main>`;
}
