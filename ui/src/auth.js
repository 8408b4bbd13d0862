// Signing in and out. OIDC: authorization code with PKCE (S256) and a `resource` indicator (the
// API's audience), state and verifier in sessionStorage, the code exchanged at the issuer's token
// endpoint (found through its discovery document). API keys: for the local demo. The session
// lives in sessionStorage: it ends with the tab.

import { ApiError, get } from './api.js';

const SESSION = 'ohx.session';
const PENDING = 'ohx.oidc.pending';
const RETURN_TO = 'ohx.return';

const store = {
  read(key) {
    try { return JSON.parse(sessionStorage.getItem(key)); } catch { return null; }
  },
  write(key, value) { sessionStorage.setItem(key, JSON.stringify(value)); },
  remove(key) { sessionStorage.removeItem(key); },
};

/** The UI's settings from the gateway: `{ api_base, oidc: { issuer, client_id, resource } | null }`. */
export async function loadConfig() {
  const res = await fetch('/ui/config.json', { cache: 'no-store' });
  if (!res.ok) throw new Error(`/ui/config.json answered HTTP ${res.status}`);
  return res.json();
}

/** Where the issuer sends the browser back to (registered at the issuer for the UI's client). */
export const redirectUri = () => `${location.origin}/ui/`;

const b64url = (bytes) => btoa(String.fromCharCode(...new Uint8Array(bytes)))
  .replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
const randomString = () => b64url(crypto.getRandomValues(new Uint8Array(32)));

async function discovery(issuer) {
  const res = await fetch(`${issuer.replace(/\/$/, '')}/.well-known/openid-configuration`);
  if (!res.ok) throw new Error(`the sign-in provider's discovery document answered HTTP ${res.status}`);
  const doc = await res.json();
  if (doc.issuer !== issuer) throw new Error(`the sign-in provider calls itself ${doc.issuer}, not ${issuer}`);
  return doc;
}

/** Sends the browser to the issuer's sign-in page. */
export async function startOidcSignIn(oidc) {
  if (!crypto.subtle) throw new Error('signing in needs a secure context (HTTPS or localhost)');
  const meta = await discovery(oidc.issuer);
  const verifier = randomString();
  const state = randomString();
  const challenge = b64url(await crypto.subtle.digest('SHA-256', new TextEncoder().encode(verifier)));
  store.write(PENDING, { state, verifier, redirect_uri: redirectUri(), hash: location.hash });
  const u = new URL(meta.authorization_endpoint);
  u.search = new URLSearchParams({
    response_type: 'code',
    client_id: oidc.client_id,
    redirect_uri: redirectUri(),
    scope: 'openid',
    state,
    code_challenge: challenge,
    code_challenge_method: 'S256',
    resource: oidc.resource,
  }).toString();
  location.assign(u.toString());
}

/**
 * Finishes an OIDC sign-in when the browser comes back from the issuer (`?code=&state=` or
 * `?error=`): returns the new session, or null when this load is not a sign-in callback.
 */
export async function completeOidcSignIn(oidc) {
  const params = new URLSearchParams(location.search);
  if (!params.has('state') || !(params.has('code') || params.has('error'))) return null;
  const pending = store.read(PENDING);
  store.remove(PENDING);
  // Drop the code from the address bar and history, whatever happens next.
  history.replaceState(null, '', `/ui/${pending?.hash || ''}`);
  if (!oidc) throw new Error('this gateway has no sign-in provider configured');
  if (!pending || pending.state !== params.get('state')) {
    throw new Error('the sign-in answer does not match a sign-in started here: sign in again');
  }
  if (params.has('error')) {
    throw new Error(`the sign-in provider refused: ${params.get('error_description') || params.get('error')}`);
  }
  if (params.has('iss') && params.get('iss') !== oidc.issuer) {
    throw new Error('the sign-in answer comes from another issuer');
  }
  const meta = await discovery(oidc.issuer);
  const res = await fetch(meta.token_endpoint, {
    method: 'POST',
    headers: { 'Content-Type': 'application/x-www-form-urlencoded', Accept: 'application/json' },
    body: new URLSearchParams({
      grant_type: 'authorization_code',
      code: params.get('code'),
      redirect_uri: pending.redirect_uri,
      client_id: oidc.client_id,
      code_verifier: pending.verifier,
      resource: oidc.resource,
    }),
  });
  const body = await res.json().catch(() => ({}));
  if (!res.ok || !body.access_token) {
    throw new Error(`the sign-in provider did not issue a token: ${body.error_description || body.error || `HTTP ${res.status}`}`);
  }
  const session = {
    kind: 'oidc',
    token: body.access_token,
    id_token: body.id_token || null,
    expires_at: body.expires_in ? Date.now() + body.expires_in * 1000 : null,
  };
  store.write(SESSION, session);
  return session;
}

/** The current session, or null (none, or expired). */
export function currentSession() {
  const s = store.read(SESSION);
  if (!s?.token) return null;
  if (s.expires_at && s.expires_at < Date.now()) {
    store.remove(SESSION);
    return null;
  }
  return s;
}

/** Signs in with an API key (ohxk_…), for the local demo. */
export function signInWithKey(key) {
  const session = { kind: 'key', token: key.trim(), expires_at: null };
  store.write(SESSION, session);
  return session;
}

/**
 * Ends the session here, and at the issuer when it supports RP-initiated logout: returns true when
 * the browser is on its way there (it comes back to /ui/).
 */
export async function signOut(oidc) {
  const session = store.read(SESSION);
  store.remove(SESSION);
  store.remove(RETURN_TO);
  if (session?.kind !== 'oidc' || !oidc) return false;
  let meta;
  try { meta = await discovery(oidc.issuer); } catch { return false; }
  if (!meta.end_session_endpoint) return false;
  const u = new URL(meta.end_session_endpoint);
  u.search = new URLSearchParams({
    client_id: oidc.client_id,
    post_logout_redirect_uri: redirectUri(),
    ...(session.id_token ? { id_token_hint: session.id_token } : {}),
  }).toString();
  location.assign(u.toString());
  return true;
}

const ROLE_ORDER = ['platform_admin', 'org_admin', 'operator', 'viewer'];

/** Whether `role` may do what `needed` may (roles include the ones below them). */
export const can = (role, needed) => ROLE_ORDER.indexOf(role) >= 0 && ROLE_ORDER.indexOf(role) <= ROLE_ORDER.indexOf(needed);

function claimsOf(jwt) {
  try {
    const part = atob(jwt.split('.')[1].replace(/-/g, '+').replace(/_/g, '/'));
    return JSON.parse(new TextDecoder().decode(Uint8Array.from(part, (c) => c.charCodeAt(0))));
  } catch {
    return {};
  }
}

/**
 * Who is signed in: `GET /api/v1/me` → `{ actor, role, organization_id }`. A gateway without that
 * endpoint (404): the access token's `ohx_roles` / `ohx_org` claims, and read-only for an API key.
 */
export async function whoAmI(session) {
  try {
    return { ...(await get('/me')), source: 'api' };
  } catch (err) {
    if (!(err instanceof ApiError) || err.status !== 404) throw err;
  }
  // Without /me the credential is not checked yet: a read any role may do (a 401 refuses it).
  await get('/ehr-targets', { limit: 1 }).catch((err) => { if (err.status !== 403) throw err; });
  if (session.kind === 'oidc') {
    const c = claimsOf(session.token);
    const names = Array.isArray(c.ohx_roles) ? c.ohx_roles : String(c.ohx_roles || '').split(/\s+/);
    const role = ROLE_ORDER.find((r) => names.includes(r)) || 'viewer';
    return { actor: `oidc:${c.sub}`, role, organization_id: c.ohx_org || null, source: 'token' };
  }
  return { actor: 'API key', role: 'viewer', organization_id: null, source: 'unknown' };
}

/** Where to go after coming back from a provider's consent page (the gateway links to /ui/). */
export const rememberReturn = (hash) => store.write(RETURN_TO, hash);
export function takeReturn() {
  const hash = store.read(RETURN_TO);
  store.remove(RETURN_TO);
  return hash;
}
