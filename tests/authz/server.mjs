// Real OAuth2 authorization server for ohx tests: oidc-provider, client_credentials grant (and, optionally, an interactive
// authorization code sign-in for the ohx configuration UI), JWT access tokens.
// Run: `npm ci --prefix tests/authz`; AUTHZ_PORT=0 AUTHZ_CLIENTS=clients.json AUTHZ_RESOURCE=http://127.0.0.1:8080/fhir \
//   AUTHZ_SCOPES="system/Observation.cu ..." [AUTHZ_TOKEN_TTL=300] [AUTHZ_SMART_STRICT=1] \
//   [AUTHZ_USERS=users.json AUTHZ_UI_CLIENT='{"client_id":"ohx-ui","redirect_uris":["http://127.0.0.1:8080/ui/"]}'] node tests/authz/server.mjs
// Stdout: one line when listening, {"issuer":"http://127.0.0.1:PORT","token_endpoint":"<issuer>/token","jwks_uri":"<issuer>/jwks"};
// logs on stderr; SIGTERM/SIGINT exit 0. Access token: RS384 JWT (typ at+jwt), iss, aud=AUTHZ_RESOURCE, exp, iat, jti, scope, client_id, sub=client_id.
// AUTHZ_CLIENTS: JSON array of {client_id, token_endpoint_auth_method: client_secret_basic|client_secret_post|private_key_jwt,
//   client_secret (secret methods), jwks_uri or jwks (private_key_jwt), token_endpoint_auth_signing_alg: RS384|ES384 (optional),
//   scope: space-separated subset of AUTHZ_SCOPES, extra_claims: optional object whose members are added to the client's
//   access tokens (e.g. the roles and organization the ohx REST API reads)}; other fields go to oidc-provider as client metadata.
//   Optional when AUTHZ_UI_CLIENT is set (none then).
// Scopes: in AUTHZ_SCOPES but not the client's -> 400 invalid_scope; unknown -> dropped; none requested -> token without scope.
// Strict (default; AUTHZ_SMART_STRICT=0 = stock oidc-provider): assertion aud must be the token endpoint (not the issuer), typ JWT,
//   kid present, exp <= now+5 min, and a secret client must use its registered basic/post method. A client JWKS is re-fetched
//   once when an assertion's kid is unknown (stock oidc-provider waits until its cached copy is >= 60 s old).
// Interactive sign-in (both AUTHZ_USERS and AUTHZ_UI_CLIENT set; either alone is refused):
//   AUTHZ_USERS: path of a JSON array of {username, password, claims: object added to the user's access tokens, e.g.
//   {"ohx_roles":["org_admin"],"ohx_org":"<uuid>"}}. AUTHZ_UI_CLIENT: JSON {client_id, redirect_uris,
//   post_logout_redirect_uris (default: redirect_uris)}: a public client (token_endpoint_auth_method none, authorization_code,
//   response_type code, PKCE S256 required). /auth shows a login form (/interaction/{uid}: labelled "Username" and "Password",
//   button "Sign in"; a wrong password re-shows it with an error); consent is granted at once (first-party client). Access
//   token: as above for AUTHZ_RESOURCE (resource indicator; also the default when none is sent), sub=username, client_id, the
//   user's claims; with scope openid an ID token too. The token endpoint answers CORS from the UI client's redirect origins.
//   /session/end (RP-initiated logout) signs out at once when given a valid id_token_hint, otherwise asks with a "Sign out" button.

// oidc-provider prints NOTICEs with console.info (stdout); keep stdout for the one JSON line.
console.log = console.error;
console.info = console.error;

const { readFileSync } = await import('node:fs');
const crypto = await import('node:crypto');
const http = await import('node:http');
const { generateKeyPair, exportJWK } = await import('jose');
const { default: Provider, errors } = await import('oidc-provider');

const log = (...args) => console.error('[authz]', ...args);

function need(name) {
  const v = process.env[name];
  if (v === undefined || v === '') {
    log(`missing required env ${name}`);
    process.exit(2);
  }
  return v;
}

const PORT = Number(process.env.AUTHZ_PORT ?? '0');
const RESOURCE = need('AUTHZ_RESOURCE');
const SCOPES = need('AUTHZ_SCOPES').split(/\s+/).filter(Boolean);
const TTL = Number(process.env.AUTHZ_TOKEN_TTL || '300');
const STRICT = (process.env.AUTHZ_SMART_STRICT ?? '1') !== '0';
const CLIENT_ALGS = ['RS384', 'ES384'];
const ACCESS_TOKEN_ALG = 'RS384';

if (!Number.isInteger(PORT) || PORT < 0 || PORT > 65535) { log('bad AUTHZ_PORT'); process.exit(2); }
if (!Number.isSafeInteger(TTL) || TTL <= 0) { log('bad AUTHZ_TOKEN_TTL'); process.exit(2); }
if (!URL.canParse(RESOURCE)) { log('AUTHZ_RESOURCE must be an absolute URL'); process.exit(2); }

// Interactive sign-in for the ohx UI: users and the UI's public client (both or neither).
const USERS_FILE = process.env.AUTHZ_USERS ?? '';
const UI_CLIENT = process.env.AUTHZ_UI_CLIENT ?? '';
if (!USERS_FILE !== !UI_CLIENT) { log('AUTHZ_USERS and AUTHZ_UI_CLIENT go together'); process.exit(2); }
const users = new Map(); // username -> {password, claims}
let uiClient;
if (UI_CLIENT) {
  const rawUsers = JSON.parse(readFileSync(USERS_FILE, 'utf8'));
  if (!Array.isArray(rawUsers)) { log('AUTHZ_USERS must hold a JSON array'); process.exit(2); }
  for (const u of rawUsers) {
    const claims = u?.claims ?? {};
    if (typeof u?.username !== 'string' || !u.username || typeof u.password !== 'string' || !u.password
      || typeof claims !== 'object' || claims === null || Array.isArray(claims)) {
      log('AUTHZ_USERS: each user needs a username, a password and an optional claims object');
      process.exit(2);
    }
    users.set(u.username, { password: u.password, claims });
  }
  const ui = JSON.parse(UI_CLIENT);
  if (typeof ui?.client_id !== 'string' || !Array.isArray(ui.redirect_uris) || ui.redirect_uris.length === 0) {
    log('AUTHZ_UI_CLIENT needs a client_id and redirect_uris');
    process.exit(2);
  }
  uiClient = {
    post_logout_redirect_uris: ui.redirect_uris,
    ...ui,
    token_endpoint_auth_method: 'none',
    grant_types: ['authorization_code'],
    response_types: ['code'],
  };
}
const uiOrigins = new Set((uiClient?.redirect_uris ?? []).map((u) => new URL(u).origin));

const rawClients = UI_CLIENT && !process.env.AUTHZ_CLIENTS ? [] : JSON.parse(readFileSync(need('AUTHZ_CLIENTS'), 'utf8'));
if (!Array.isArray(rawClients)) { log('AUTHZ_CLIENTS must hold a JSON array'); process.exit(2); }
const clients = rawClients.map((c) => ({
  grant_types: ['client_credentials'],
  response_types: [],
  redirect_uris: [],
  ...c,
}));
if (uiClient) clients.push(uiClient);

// Access-token signing key, fresh at every start.
const { privateKey } = await generateKeyPair(ACCESS_TOKEN_ALG, { extractable: true });
const signingJwk = { ...(await exportJWK(privateKey)), kid: `at-${Date.now().toString(36)}`, alg: ACCESS_TOKEN_ALG, use: 'sig' };

const server = http.createServer();
await new Promise((resolve, reject) => {
  server.once('error', reject);
  server.listen(PORT, '127.0.0.1', resolve);
});
const { port } = server.address();
const issuer = `http://127.0.0.1:${port}`;

const isLoopback = (url) => {
  const { hostname } = new URL(url);
  return hostname === 'localhost' || hostname === '[::1]' || /^127\.\d+\.\d+\.\d+$/.test(hostname);
};

const provider = new Provider(issuer, {
  clients,
  jwks: { keys: [signingJwk] },
  scopes: SCOPES,
  clientAuthMethods: ['client_secret_basic', 'client_secret_post', 'private_key_jwt', ...(uiClient ? ['none'] : [])],
  enabledJWA: { clientAuthSigningAlgValues: CLIENT_ALGS, idTokenSigningAlgValues: [ACCESS_TOKEN_ALG] },
  clientDefaults: { id_token_signed_response_alg: ACCESS_TOKEN_ALG },
  cookies: { keys: [crypto.randomBytes(32).toString('base64url')] },
  // The UI client only; PKCE (S256, the only method oidc-provider 9 supports) on every authorization request.
  pkce: { required: () => true },
  clientBasedCORS: (ctx, origin, client) => client.clientId === uiClient?.client_id && uiOrigins.has(origin),
  async findAccount(ctx, sub) {
    if (!users.has(sub)) return undefined;
    return { accountId: sub, async claims() { return { sub }; } };
  },
  features: {
    devInteractions: { enabled: false },
    rpInitiatedLogout: { enabled: Boolean(uiClient), logoutSource, postLogoutSuccessSource },
    clientCredentials: { enabled: true },
    introspection: { enabled: true },
    resourceIndicators: {
      enabled: true,
      // SMART Backend Services sends no `resource`: every token is for AUTHZ_RESOURCE.
      defaultResource: () => RESOURCE,
      useGrantedResource: () => true,
      getResourceServerInfo(ctx, resourceIndicator) {
        if (resourceIndicator !== RESOURCE) {
          throw new errors.InvalidTarget(`unknown resource ${resourceIndicator}`);
        }
        return {
          scope: SCOPES.join(' '),
          audience: RESOURCE,
          accessTokenTTL: TTL,
          accessTokenFormat: 'jwt',
          jwt: { sign: { alg: ACCESS_TOKEN_ALG } },
        };
      },
    },
  },
  ttl: {
    ClientCredentials: TTL, AccessToken: TTL, IdToken: TTL, AuthorizationCode: 60, Interaction: 600, Session: 8 * 3600, Grant: 8 * 3600,
  },
  extraClientMetadata: {
    properties: ['extra_claims'],
    validator(ctx, key, value) {
      if (key === 'extra_claims' && value !== undefined && (typeof value !== 'object' || value === null || Array.isArray(value))) {
        throw new errors.InvalidClientMetadata('extra_claims must be an object');
      }
    },
  },
  async extraTokenClaims(ctx, token) {
    const client = ctx.oidc.client ?? (await provider.Client.find(token.clientId));
    const user = token.accountId ? users.get(token.accountId)?.claims : undefined;
    return client?.extra_claims || user ? { ...client?.extra_claims, ...user } : undefined;
  },
  // SMART Backend Services rules on top of oidc-provider's own (exp, jti, iss=client_id, aud in
  // {issuer, token endpoint}, one-time jti). Called after the signature check, before the jti is burnt.
  async assertJwtClientAuthClaimsAndHeader(ctx, claims, header, client) {
    if (!STRICT) return;
    const tokenUrl = ctx.oidc.urlFor('token');
    const auds = Array.isArray(claims.aud) ? claims.aud : [claims.aud];
    if (!auds.includes(tokenUrl)) {
      throw new errors.InvalidClientAuth(`SMART: aud must be the token endpoint ${tokenUrl}`);
    }
    if (claims.sub !== client.clientId) {
      throw new errors.InvalidClientAuth('SMART: sub must be the client_id');
    }
    if (typeof header.kid !== 'string' || !header.kid) {
      throw new errors.InvalidClientAuth('SMART: kid header is required');
    }
    if (header.typ !== 'JWT') {
      throw new errors.InvalidClientAuth('SMART: typ header must be "JWT"');
    }
    if (claims.exp - Math.floor(Date.now() / 1000) > 300 + 5) {
      throw new errors.InvalidClientAuth('SMART: exp must be at most 5 minutes in the future');
    }
  },
  // oidc-provider blocks special-use IPs (127/8 included) when fetching jwks_uri; clients here serve
  // their JWKS on loopback, so fetch loopback URLs without that guard, and nothing else.
  fetch(url, options) {
    if (!isLoopback(url)) {
      throw new Error(`refusing to fetch non-loopback URL ${url}`);
    }
    delete options.dispatcher;
    return globalThis.fetch(url, options);
  },
  renderError(ctx, out) {
    ctx.type = 'json';
    ctx.body = out;
  },
});

for (const ev of ['grant.error', 'server_error', 'introspection.error']) {
  provider.on(ev, (ctx, err) => {
    log(`${ev}: ${err.error ?? err.name}: ${err.error_description ?? err.message}${err.error_detail ? ` (${err.error_detail})` : ''}${err.cause ? ` cause: ${err.cause.message ?? err.cause}` : ''}`);
  });
}
provider.on('grant.success', (ctx) => log(`token issued to ${ctx.oidc.client?.clientId}`));

// Instantiate (and so validate) every client now: a bad clients file fails at start, not at first use.
let keyStoreProto;
for (const { client_id: id } of clients) {
  let client;
  try {
    client = await provider.Client.find(id);
  } catch (err) {
    log(`client ${id}: ${err.error_description ?? err.message}`);
    process.exit(2);
  }
  if (client.jwksUri && !keyStoreProto) keyStoreProto = Object.getPrototypeOf(client.asymmetricKeyStore);
}

// Key rotation. Stock oidc-provider refreshes a client's JWKS only when verification fails AND the cached
// copy is stale (at least 60 s old, longer if the JWKS response's Cache-Control/Expires say so), so a
// new kid within 60 s of the last fetch would be refused. Make an unknown kid force one re-fetch.
// FORCE marks the store stale; JUST stops the retry that follows a forced fetch from forcing another.
if (keyStoreProto) {
  const FORCE = Symbol('force');
  const JUST = Symbol('just');
  const { selectForVerify, fresh, refresh } = keyStoreProto;
  keyStoreProto.selectForVerify = function patchedSelectForVerify(opts) {
    const keys = selectForVerify.call(this, opts);
    const just = this[JUST];
    this[JUST] = false;
    if (this.jwksUri && keys.length === 0 && opts?.kid !== undefined && !just) {
      this[FORCE] = true;
    }
    return keys;
  };
  keyStoreProto.fresh = function patchedFresh() {
    return this[FORCE] ? false : fresh.call(this);
  };
  keyStoreProto.refresh = async function patchedRefresh() {
    const forced = this[FORCE];
    try {
      await refresh.call(this);
    } finally {
      if (forced) {
        this[FORCE] = false;
        this[JUST] = true;
        log(`fetched JWKS of ${this.client?.clientId}: assertion kid was not in the cached set`);
      }
    }
  };
}

// ---------- interactive sign-in pages ----------
const esc = (v) => String(v).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
function page(title, body) {
  return `<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>${esc(title)} - ohx test sign-in</title>
<style>body{font-family:system-ui,sans-serif;max-width:24rem;margin:3rem auto;padding:0 1rem}label,input,button{display:block;font-size:1rem}
input{width:100%;margin:.25rem 0 1rem;padding:.4rem;box-sizing:border-box}button{padding:.5rem 1rem;margin-top:.5rem}
.error{color:#a00000;font-weight:600}</style></head>
<body><main>${body}</main></body></html>`;
}
function sendHtml(res, status, html) {
  res.writeHead(status, {
    'content-type': 'text/html; charset=utf-8',
    'cache-control': 'no-store',
    'x-frame-options': 'DENY',
    'content-security-policy': "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'",
  }).end(html);
}
function loginPage(uid, { username = '', error } = {}) {
  const err = error ? `<p id="login-error" class="error" role="alert">${esc(error)}</p>` : '';
  const described = error ? ' aria-describedby="login-error" aria-invalid="true"' : '';
  return page('Sign in', `<h1>Sign in</h1>
<p>ohx test identity provider</p>${err}
<form method="post" action="/interaction/${esc(uid)}/login" autocomplete="off">
<label for="username">Username</label><input id="username" name="username" value="${esc(username)}" required autofocus${described}>
<label for="password">Password</label><input id="password" name="password" type="password" required${described}>
<button type="submit">Sign in</button>
</form>
<form method="post" action="/interaction/${esc(uid)}/abort"><button type="submit">Cancel</button></form>`);
}
async function readForm(req) {
  let body = '';
  for await (const chunk of req) {
    body += chunk;
    if (body.length > 8192) throw new Error('form too large');
  }
  return new URLSearchParams(body);
}
const digest = (text) => crypto.createHash('sha256').update(text).digest();
function passwordOk(username, password) {
  const user = users.get(username);
  // Compare digests in constant time; an unknown user costs the same as a wrong password.
  return crypto.timingSafeEqual(digest(user?.password ?? crypto.randomUUID()), digest(password)) && user !== undefined;
}
// /interaction/{uid}: the login form or the automatic consent; /interaction/{uid}/login and /abort: its submissions.
async function interaction(req, res) {
  const [, , uid, action] = req.url.split('?')[0].split('/');
  let details;
  try {
    details = await provider.interactionDetails(req, res);
  } catch (err) {
    log(`interaction ${uid}: ${err.message}`);
    sendHtml(res, 400, page('Sign-in expired', '<h1>Sign-in expired</h1><p role="alert">This sign-in has expired or is unknown: start again from the application.</p>'));
    return;
  }
  if (details.uid !== uid) {
    sendHtml(res, 400, page('Sign-in expired', '<h1>Sign-in expired</h1><p role="alert">Start again from the application.</p>'));
    return;
  }
  const { prompt, params, session, grantId } = details;
  if (req.method === 'POST' && action === 'abort') {
    await provider.interactionFinished(req, res, { error: 'access_denied', error_description: 'the user cancelled' }, { mergeWithLastSubmission: false });
    return;
  }
  if (req.method === 'POST' && action === 'login' && prompt.name === 'login') {
    const form = await readForm(req);
    const username = form.get('username') ?? '';
    if (!passwordOk(username, form.get('password') ?? '')) {
      log(`login failed for ${JSON.stringify(username)}`);
      sendHtml(res, 200, loginPage(uid, { username, error: 'Wrong username or password.' }));
      return;
    }
    log(`login: ${username}`);
    await provider.interactionFinished(req, res, { login: { accountId: username } }, { mergeWithLastSubmission: false });
    return;
  }
  if (req.method === 'GET' && !action && prompt.name === 'login') {
    sendHtml(res, 200, loginPage(uid));
    return;
  }
  if (req.method === 'GET' && !action && prompt.name === 'consent') {
    // First-party client: grant what it asked for (OIDC scopes, claims, resource scopes) without asking.
    const grant = grantId ? await provider.Grant.find(grantId) : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
    const d = prompt.details;
    if (d.missingOIDCScope) grant.addOIDCScope(d.missingOIDCScope.join(' '));
    if (d.missingOIDCClaims) grant.addOIDCClaims(d.missingOIDCClaims);
    for (const [indicator, scopes] of Object.entries(d.missingResourceScopes ?? {})) grant.addResourceScope(indicator, scopes.join(' '));
    await provider.interactionFinished(req, res, { consent: { grantId: await grant.save() } }, { mergeWithLastSubmission: true });
    return;
  }
  sendHtml(res, 400, page('Not possible', `<h1>Not possible</h1><p role="alert">Nothing to do for ${esc(req.method)} ${esc(action ?? '')} at the ${esc(prompt.name)} step.</p>`));
}
// RP-initiated logout: with a valid id_token_hint the RP is known, sign out at once; otherwise ask.
async function logoutSource(ctx, form) {
  const yes = form.replace('</form>', '<input type="hidden" name="logout" value="yes"/></form>');
  const auto = ctx.oidc.entities.IdTokenHint
    ? "<script>document.addEventListener('DOMContentLoaded', function () { document.forms[0].submit() });</script>" : '';
  ctx.type = 'html';
  ctx.body = page('Sign out', `${auto}<h1>Sign out</h1><p>Sign out of the ohx test identity provider?</p>${yes}
<button type="submit" form="op.logoutForm">Sign out</button>`);
}
async function postLogoutSuccessSource(ctx) {
  ctx.type = 'html';
  ctx.body = page('Signed out', '<h1>Signed out</h1><p>You are signed out.</p>');
}

const tokenEndpoint = `${issuer}/token`;
const jwksUri = `${issuer}/jwks`;
const smartConfiguration = JSON.stringify({
  issuer,
  token_endpoint: tokenEndpoint,
  jwks_uri: jwksUri,
  grant_types_supported: ['client_credentials'],
  token_endpoint_auth_methods_supported: ['client_secret_basic', 'client_secret_post', 'private_key_jwt'],
  token_endpoint_auth_signing_alg_values_supported: CLIENT_ALGS,
  scopes_supported: SCOPES,
  capabilities: ['client-confidential-symmetric', 'client-confidential-asymmetric'],
});

// oidc-provider accepts client_secret_basic and client_secret_post interchangeably for any secret client.
// In strict mode the method must be the registered one. The body read here is handed on as req.body,
// which oidc-provider parses when the stream is already consumed.
const methodOf = new Map(clients.map((c) => [c.client_id, c.token_endpoint_auth_method ?? 'client_secret_basic']));
async function checkSecretMethod(req) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > 56 * 1024) return 'request body too large';
    chunks.push(chunk);
  }
  req.body = Buffer.concat(chunks);
  const params = new URLSearchParams(req.body.toString('utf8'));
  let used;
  let id;
  const auth = req.headers.authorization;
  if (typeof auth === 'string' && /^basic /i.test(auth)) {
    used = 'client_secret_basic';
    const basic = Buffer.from(auth.slice(6).trim(), 'base64').toString('utf8');
    try {
      id = decodeURIComponent(basic.slice(0, basic.indexOf(':')).replace(/\+/g, '%20'));
    } catch {
      return undefined;
    }
  } else if (params.has('client_secret')) {
    used = 'client_secret_post';
    id = params.get('client_id');
  }
  const registered = methodOf.get(id);
  if (used && registered && used !== registered) {
    return `client ${id} is registered for ${registered}, not ${used}`;
  }
  return undefined;
}

const callback = provider.callback();
server.on('request', async (req, res) => {
  try {
    if (uiClient && req.url.startsWith('/interaction/')) {
      await interaction(req, res);
      return;
    }
    if (req.method === 'GET' && req.url === '/.well-known/smart-configuration') {
      res.writeHead(200, { 'content-type': 'application/json' }).end(smartConfiguration);
      return;
    }
    if (STRICT && req.method === 'POST' && req.url.split('?')[0] === '/token') {
      const problem = await checkSecretMethod(req);
      if (problem) {
        log(`grant.error: invalid_client: client authentication failed (${problem})`);
        res.writeHead(401, { 'content-type': 'application/json', 'cache-control': 'no-store' })
          .end(JSON.stringify({ error: 'invalid_client', error_description: 'client authentication failed' }));
        return;
      }
    }
    callback(req, res);
  } catch (err) {
    log(`request error: ${err.message}`);
    if (!res.headersSent) res.writeHead(400).end();
  }
});

process.stdout.write(`${JSON.stringify({ issuer, token_endpoint: tokenEndpoint, jwks_uri: jwksUri })}\n`);
log(`listening on ${issuer}; resource ${RESOURCE}; token ttl ${TTL}s; ${clients.length} client(s); smart strict ${STRICT}`);

function shutdown(sig) {
  log(`${sig}: shutting down`);
  server.close(() => process.exit(0));
  server.closeAllConnections();
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on('SIGTERM', () => shutdown('SIGTERM'));
process.on('SIGINT', () => shutdown('SIGINT'));
