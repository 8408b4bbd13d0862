// Sign in: with the organization's identity provider (OIDC), or with an API key (local demo).

import { useState } from 'preact/hooks';
import { signInWithKey, startOidcSignIn } from '../auth.js';
import { ErrorBox, Field, Page, html } from '../ui.js';

export function SignIn({ config, error: refused, onSession }) {
  const [key, setKey] = useState('');
  const [local, setError] = useState(null);
  const error = local || refused;
  const [busy, setBusy] = useState(false);

  const oidc = async () => {
    setBusy(true);
    setError(null);
    try {
      await startOidcSignIn(config.oidc);
    } catch (err) {
      setError(err);
      setBusy(false);
    }
  };
  const withKey = (e) => {
    e.preventDefault();
    if (!key.trim().startsWith('ohxk_')) {
      setError({ detail: 'An ohx API key starts with ohxk_.', fields: new Map([['api_key', 'starts with ohxk_']]), errors: [] });
      return;
    }
    onSession(signInWithKey(key));
  };

  return html`<${Page} title="Sign in">
    <${ErrorBox} error=${error} shown=${['api_key']} />
    ${config.oidc
      ? html`<section aria-labelledby="oidc-title" class="card">
          <h2 id="oidc-title">Your organization's account</h2>
          <p>Sign in at your organization's identity provider; you come back here afterwards.</p>
          <button type="button" class="primary" onClick=${oidc} disabled=${busy}>Sign in with your organization</button>
        </section>`
      : html`<p>This gateway has no identity provider configured: sign in with an API key.</p>`}
    <section aria-labelledby="key-title" class="card">
      <h2 id="key-title">Local demo</h2>
      <form onSubmit=${withKey}>
        <${Field} label="API key" path="api_key" type="password" value=${key} onValue=${setKey} required
          error=${error} hint="For the local demo: a key made with the API or the ohx command (ohxk_…). It stays in this tab only." />
        <button type="submit">Sign in with the API key</button>
      </form>
    </section>
  <//>`;
}
