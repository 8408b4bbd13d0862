// Self-check of server.mjs with real HTTP: `npm ci --prefix tests/authz && node tests/authz/selftest.mjs`.
// Starts server.mjs as a child (twice: strict with AUTHZ_TOKEN_TTL=123, then AUTHZ_SMART_STRICT=0 with the
// default TTL), serves the private_key_jwt clients' JWKS itself, and signs client assertions with node:crypto.
// Prints one line per check, then "selftest: N passed, M failed"; exits 1 on any failure. AUTHZ_SELFTEST_VERBOSE=1
// echoes the server's stderr.

import { spawn } from 'node:child_process';
import crypto from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const RESOURCE = 'http://127.0.0.1:8080/fhir';
const SCOPES = 'system/Observation.cu system/Observation.rs system/Device.cu system/DeviceAssociation.cu system/Observation.write';
const VERBOSE = process.env.AUTHZ_SELFTEST_VERBOSE === '1';

let passed = 0;
let failed = 0;
function check(name, ok, detail = '') {
  if (ok) passed += 1; else failed += 1;
  console.log(`${ok ? 'ok  ' : 'FAIL'} ${name}${!ok && detail ? ` -- ${detail}` : ''}`);
}

// ---------- JOSE helpers on node:crypto ----------
const b64u = (buf) => Buffer.from(buf).toString('base64url');
const ALG = {
  RS384: { hash: 'sha384', opts: {} },
  ES384: { hash: 'sha384', opts: { dsaEncoding: 'ieee-p1363' } },
  RS256: { hash: 'sha256', opts: {} },
};
function newKey(alg, kid) {
  const { privateKey, publicKey } = alg.startsWith('ES')
    ? crypto.generateKeyPairSync('ec', { namedCurve: 'P-384' })
    : crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  return { alg, kid, privateKey, jwk: { ...publicKey.export({ format: 'jwk' }), kid, alg, use: 'sig' } };
}
function signJwt(header, payload, key) {
  const input = `${b64u(JSON.stringify(header))}.${b64u(JSON.stringify(payload))}`;
  const { hash, opts } = ALG[key.alg];
  const sig = crypto.sign(hash, Buffer.from(input), { key: key.privateKey, ...opts });
  return `${input}.${b64u(sig)}`;
}
function decodeJwt(jwt) {
  const [h, p] = jwt.split('.');
  return { header: JSON.parse(Buffer.from(h, 'base64url')), payload: JSON.parse(Buffer.from(p, 'base64url')) };
}
async function verifyJwt(jwt, jwksUri) {
  const { header } = decodeJwt(jwt);
  const { keys } = await (await fetch(jwksUri)).json();
  const jwk = keys.find((k) => k.kid === header.kid);
  if (!jwk || !ALG[header.alg]) return false;
  const [h, p, s] = jwt.split('.');
  const { hash, opts } = ALG[header.alg];
  return crypto.verify(hash, Buffer.from(`${h}.${p}`), { key: crypto.createPublicKey({ key: jwk, format: 'jwk' }), ...opts }, Buffer.from(s, 'base64url'));
}
function assertion(key, clientId, aud, overrides = {}, headerOverrides = {}) {
  const now = Math.floor(Date.now() / 1000);
  return signJwt(
    { alg: key.alg, kid: key.kid, typ: 'JWT', ...headerOverrides },
    { iss: clientId, sub: clientId, aud, exp: now + 240, jti: crypto.randomUUID(), ...overrides },
    key,
  );
}

// ---------- client JWKS server (what ohx's publisher would serve) ----------
const jwksSets = new Map(); // path -> array of public JWKs
const jwksFetches = new Map(); // path -> count
const jwksServer = http.createServer((req, res) => {
  const keys = jwksSets.get(req.url);
  if (!keys) { res.writeHead(404).end(); return; }
  jwksFetches.set(req.url, (jwksFetches.get(req.url) ?? 0) + 1);
  // A long cache lifetime: rotation must work anyway (unknown kid => re-fetch).
  res.writeHead(200, { 'content-type': 'application/json', 'cache-control': 'public, max-age=3600' })
    .end(JSON.stringify({ keys }));
});
await new Promise((r) => jwksServer.listen(0, '127.0.0.1', r));
const jwksBase = `http://127.0.0.1:${jwksServer.address().port}`;

// ---------- clients ----------
const esKey1 = newKey('ES384', 'es-1');
const esKey2 = newKey('ES384', 'es-2');
const rsKey1 = newKey('RS384', 'rs-1');
const rsKeyWrongAlg = newKey('RS256', 'rs-256');
jwksSets.set('/ehr-targets/es/jwks.json', [esKey1.jwk]);
jwksSets.set('/ehr-targets/rs/jwks.json', [rsKey1.jwk, rsKeyWrongAlg.jwk]);

const dir = mkdtempSync(path.join(tmpdir(), 'ohx-authz-'));
const clientsFile = path.join(dir, 'clients.json');
writeFileSync(clientsFile, JSON.stringify([
  { client_id: 'ohx-secret', client_secret: 's3cret', token_endpoint_auth_method: 'client_secret_basic', scope: 'system/Observation.cu system/Device.cu' },
  { client_id: 'ohx-post', client_secret: 'p0st', token_endpoint_auth_method: 'client_secret_post', scope: 'system/Observation.cu' },
  { client_id: 'ohx-smart-es', token_endpoint_auth_method: 'private_key_jwt', jwks_uri: `${jwksBase}/ehr-targets/es/jwks.json`, token_endpoint_auth_signing_alg: 'ES384', scope: 'system/Observation.cu system/Device.cu system/DeviceAssociation.cu' },
  { client_id: 'ohx-smart-rs', token_endpoint_auth_method: 'private_key_jwt', jwks_uri: `${jwksBase}/ehr-targets/rs/jwks.json`, scope: 'system/Observation.cu' },
], null, 2));

// ---------- server child process ----------
const children = new Set();
async function startServer(extraEnv) {
  const child = spawn(process.execPath, [path.join(HERE, 'server.mjs')], {
    env: {
      ...process.env, AUTHZ_PORT: '0', AUTHZ_CLIENTS: clientsFile, AUTHZ_RESOURCE: RESOURCE, AUTHZ_SCOPES: SCOPES, ...extraEnv,
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  children.add(child);
  const stderr = [];
  child.stderr.on('data', (d) => { stderr.push(d); if (VERBOSE) process.stderr.write(d); });
  const exited = new Promise((r) => child.once('exit', (code, signal) => { children.delete(child); r({ code, signal }); }));
  const lines = createInterface({ input: child.stdout });
  const first = await Promise.race([
    new Promise((r) => lines.once('line', r)),
    exited.then(() => null),
    new Promise((r) => setTimeout(() => r(null), 15000)),
  ]);
  const extra = [];
  lines.on('line', (l) => extra.push(l));
  if (!first) throw new Error(`server.mjs did not start:\n${Buffer.concat(stderr)}`);
  return { child, info: JSON.parse(first), exited, stderr, extraStdout: extra };
}

async function token(endpoint, { basic, form = {} } = {}) {
  const headers = { 'content-type': 'application/x-www-form-urlencoded' };
  if (basic) headers.authorization = `Basic ${Buffer.from(`${encodeURIComponent(basic[0])}:${encodeURIComponent(basic[1])}`).toString('base64')}`;
  const res = await fetch(endpoint, { method: 'POST', headers, body: new URLSearchParams({ grant_type: 'client_credentials', ...form }) });
  return { status: res.status, body: await res.json().catch(() => ({})) };
}
const jwtForm = (a, scope) => ({
  client_assertion_type: 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer', client_assertion: a, ...(scope ? { scope } : {}),
});

let exitCode = 1;
try {
  // ===== strict server, TTL 123 =====
  const s1 = await startServer({ AUTHZ_TOKEN_TTL: '123' });
  const { issuer, token_endpoint: tokenUrl, jwks_uri: serverJwks } = s1.info;
  check('stdout line has issuer/token_endpoint/jwks_uri',
    /^http:\/\/127\.0\.0\.1:\d+$/.test(issuer) && tokenUrl === `${issuer}/token` && serverJwks === `${issuer}/jwks`
      && Object.keys(s1.info).join() === 'issuer,token_endpoint,jwks_uri', JSON.stringify(s1.info));

  // (a) client_secret_basic
  {
    const r = await token(tokenUrl, { basic: ['ohx-secret', 's3cret'], form: { scope: 'system/Observation.cu system/Device.cu' } });
    const ok = r.status === 200 && typeof r.body.access_token === 'string';
    check('(a) client_secret_basic gets a token', ok, JSON.stringify(r));
    if (ok) {
      const { header, payload } = decodeJwt(r.body.access_token);
      const now = Math.floor(Date.now() / 1000);
      check('(a) access token is a JWT signed RS384 (typ at+jwt), verifies with jwks_uri',
        header.alg === 'RS384' && header.typ === 'at+jwt' && await verifyJwt(r.body.access_token, serverJwks), JSON.stringify(header));
      check('(a) claims iss/aud/scope/client_id/sub/exp',
        payload.iss === issuer && payload.aud === RESOURCE && payload.scope === 'system/Observation.cu system/Device.cu'
          && payload.client_id === 'ohx-secret' && payload.sub === 'ohx-secret' && payload.exp > now && payload.exp <= now + 124,
        JSON.stringify(payload));
      // (g) TTL
      check('(g) AUTHZ_TOKEN_TTL=123 -> expires_in 123 and exp-iat 123',
        r.body.expires_in === 123 && payload.exp - payload.iat === 123, `${r.body.expires_in} ${payload.exp - payload.iat}`);
    }
  }
  {
    const r = await token(tokenUrl, { basic: ['ohx-secret', 's3cret'], form: { scope: 'system/Observation.cu system/Observation.rs' } });
    check('scope known but not allowed for client -> 400 invalid_scope', r.status === 400 && r.body.error === 'invalid_scope', JSON.stringify(r));
    const r2 = await token(tokenUrl, { basic: ['ohx-secret', 's3cret'], form: { scope: 'system/Observation.cu system/Unknown.cu' } });
    check('scope unknown to AUTHZ_SCOPES -> silently dropped', r2.status === 200 && r2.body.scope === 'system/Observation.cu', JSON.stringify(r2.body.scope));
    const r3 = await token(tokenUrl, { basic: ['ohx-secret', 's3cret'] });
    check('no scope requested -> token without scope', r3.status === 200 && r3.body.scope === undefined
      && decodeJwt(r3.body.access_token).payload.scope === undefined, JSON.stringify(r3.body.scope));
  }
  // (b) wrong secret
  {
    const r = await token(tokenUrl, { basic: ['ohx-secret', 'wrong'], form: { scope: 'system/Observation.cu' } });
    check('(b) wrong secret -> 401 invalid_client', r.status === 401 && r.body.error === 'invalid_client', JSON.stringify(r));
  }
  // client_secret_post, and strict method matching
  {
    const r = await token(tokenUrl, { form: { client_id: 'ohx-post', client_secret: 'p0st', scope: 'system/Observation.cu' } });
    check('client_secret_post gets a token', r.status === 200 && decodeJwt(r.body.access_token).payload.client_id === 'ohx-post', JSON.stringify(r));
    const r2 = await token(tokenUrl, { form: { client_id: 'ohx-secret', client_secret: 's3cret', scope: 'system/Observation.cu' } });
    check('basic client using client_secret_post -> 401 (strict)', r2.status === 401 && r2.body.error === 'invalid_client', JSON.stringify(r2));
  }
  // (c) private_key_jwt ES384, (e) replay
  {
    const a = assertion(esKey1, 'ohx-smart-es', tokenUrl);
    const r = await token(tokenUrl, { form: jwtForm(a, 'system/Observation.cu system/DeviceAssociation.cu') });
    const ok = r.status === 200;
    check('(c) private_key_jwt ES384 gets a token', ok && decodeJwt(r.body.access_token).payload.sub === 'ohx-smart-es'
      && r.body.scope === 'system/Observation.cu system/DeviceAssociation.cu', JSON.stringify(r));
    const replay = await token(tokenUrl, { form: jwtForm(a, 'system/Observation.cu') });
    check('(e) replayed assertion (same jti) -> 401 invalid_client', replay.status === 401 && replay.body.error === 'invalid_client', JSON.stringify(replay));
  }
  // (d) private_key_jwt RS384 (client without a pinned alg)
  {
    const r = await token(tokenUrl, { form: jwtForm(assertion(rsKey1, 'ohx-smart-rs', tokenUrl), 'system/Observation.cu') });
    check('(d) private_key_jwt RS384 gets a token', r.status === 200 && decodeJwt(r.body.access_token).payload.client_id === 'ohx-smart-rs', JSON.stringify(r));
    const r2 = await token(tokenUrl, { form: jwtForm(assertion(rsKeyWrongAlg, 'ohx-smart-rs', tokenUrl), 'system/Observation.cu') });
    check('RS256 assertion -> 401 (only RS384/ES384 allowed)', r2.status === 401 && r2.body.error === 'invalid_client', JSON.stringify(r2));
    const r3 = await token(tokenUrl, { form: jwtForm(assertion(rsKey1, 'ohx-smart-es', tokenUrl), 'system/Observation.cu') });
    check('RS384 assertion for client pinned to ES384 -> 401', r3.status === 401, JSON.stringify(r3));
  }
  // assertion claim rules
  {
    const cases = [
      ['aud = issuer -> 401 (strict; stock oidc-provider accepts it)', {}, { aud: issuer }],
      ['aud = other URL -> 401', {}, { aud: `${issuer}/other` }],
      ['no exp -> 401', {}, { exp: undefined }],
      ['exp 10 minutes ahead -> 401 (strict)', {}, { exp: Math.floor(Date.now() / 1000) + 600 }],
      ['expired -> 401', {}, { exp: Math.floor(Date.now() / 1000) - 60 }],
      ['no jti -> 401', {}, { jti: undefined }],
      ['sub != client_id -> 401 (oidc-provider finds the client by sub)', {}, { sub: 'someone' }],
      ['no kid -> 401 (strict)', { kid: undefined }, {}],
      ['typ missing -> 401 (strict)', { typ: undefined }, {}],
    ];
    for (const [name, h, p] of cases) {
      const r = await token(tokenUrl, { form: jwtForm(assertion(esKey1, 'ohx-smart-es', tokenUrl, p, h), 'system/Observation.cu') });
      check(`assertion ${name}`, r.status === 401 && r.body.error === 'invalid_client', JSON.stringify(r));
    }
    const r = await token(tokenUrl, { form: jwtForm(assertion(esKey1, 'ohx-smart-es', [tokenUrl]), 'system/Observation.cu') });
    check('assertion aud = [token endpoint] (array) accepted', r.status === 200, JSON.stringify(r));
  }
  // (f) rotation
  {
    const p = '/ehr-targets/es/jwks.json';
    const before = jwksFetches.get(p) ?? 0;
    jwksSets.set(p, [esKey1.jwk, esKey2.jwk]);
    const r = await token(tokenUrl, { form: jwtForm(assertion(esKey2, 'ohx-smart-es', tokenUrl), 'system/Observation.cu') });
    check('(f) new kid added to client JWKS (served with max-age=3600) -> token', r.status === 200, JSON.stringify(r));
    check('(f) exactly one JWKS re-fetch for the new kid', (jwksFetches.get(p) ?? 0) === before + 1, `${before} -> ${jwksFetches.get(p)}`);
    const r2 = await token(tokenUrl, { form: jwtForm(assertion(esKey1, 'ohx-smart-es', tokenUrl), 'system/Observation.cu') });
    check('(f) old kid still accepted while in JWKS', r2.status === 200, JSON.stringify(r2));
    const ghost = newKey('ES384', 'es-ghost');
    const mid = jwksFetches.get(p);
    const r3 = await token(tokenUrl, { form: jwtForm(assertion(ghost, 'ohx-smart-es', tokenUrl), 'system/Observation.cu') });
    check('(f) kid absent from JWKS -> 401 after one re-fetch (no loop)', r3.status === 401 && jwksFetches.get(p) === mid + 1, `${r3.status} ${mid} -> ${jwksFetches.get(p)}`);
    // Informational: stock behaviour keeps a removed key until a failure triggers a re-fetch.
    jwksSets.set(p, [esKey2.jwk]);
    const r4 = await token(tokenUrl, { form: jwtForm(assertion(esKey1, 'ohx-smart-es', tokenUrl), 'system/Observation.cu') });
    console.log(`info key removed from JWKS, cached copy -> HTTP ${r4.status} (oidc-provider only re-fetches on a verification failure)`);
  }
  // discovery
  {
    const d = await (await fetch(`${issuer}/.well-known/smart-configuration`)).json();
    check('/.well-known/smart-configuration served', d.token_endpoint === tokenUrl
      && d.token_endpoint_auth_signing_alg_values_supported.join() === 'RS384,ES384', JSON.stringify(d));
  }
  // SIGTERM
  s1.child.kill('SIGTERM');
  const ex = await Promise.race([s1.exited, new Promise((r) => setTimeout(() => r({ code: 'timeout' }), 5000))]);
  check('SIGTERM -> exit 0', ex.code === 0, JSON.stringify(ex));
  check('stdout had exactly one line', s1.extraStdout.length === 0, JSON.stringify(s1.extraStdout));

  // ===== non-strict server, default TTL =====
  const s2 = await startServer({ AUTHZ_TOKEN_TTL: '', AUTHZ_SMART_STRICT: '0' });
  {
    const r = await token(s2.info.token_endpoint, { basic: ['ohx-secret', 's3cret'], form: { scope: 'system/Device.cu' } });
    const { payload } = decodeJwt(r.body.access_token ?? 'e30.e30');
    check('(g) default TTL 300', r.status === 200 && r.body.expires_in === 300 && payload.exp - payload.iat === 300, JSON.stringify(r.body.expires_in));
    const a = assertion(esKey2, 'ohx-smart-es', s2.info.issuer);
    const r2 = await token(s2.info.token_endpoint, { form: jwtForm(a, 'system/Observation.cu') });
    check('AUTHZ_SMART_STRICT=0: aud = issuer accepted (oidc-provider default)', r2.status === 200, JSON.stringify(r2));
    const r3 = await token(s2.info.token_endpoint, { form: { client_id: 'ohx-secret', client_secret: 's3cret' } });
    check('AUTHZ_SMART_STRICT=0: basic client may use client_secret_post (oidc-provider default)', r3.status === 200, JSON.stringify(r3));
  }
  s2.child.kill('SIGTERM');
  check('SIGTERM -> exit 0 (second server)', (await s2.exited).code === 0);
  if (failed && !VERBOSE) process.stderr.write(`--- server stderr ---\n${Buffer.concat(s1.stderr)}\n`);
  exitCode = failed ? 1 : 0;
} catch (err) {
  failed += 1;
  console.log(`FAIL unexpected error: ${err.stack ?? err}`);
} finally {
  for (const c of children) c.kill('SIGTERM');
  jwksServer.close();
  jwksServer.closeAllConnections();
  rmSync(dir, { recursive: true, force: true });
}
console.log(`selftest: ${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : exitCode);
