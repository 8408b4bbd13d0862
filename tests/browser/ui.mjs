// End-to-end test of the ohx configuration UI in headless Chromium (Debian's, no browser download), against a running
// stack: gateway serving the UI, OIDC issuer with interactive sign-in (tests/authz/server.mjs with AUTHZ_USERS and
// AUTHZ_UI_CLIENT), provider simulator, pipeline, FHIR server holding OHX_UI_PATIENT_REFERENCE.
// Run: `npm ci --prefix tests/browser && OHX_UI_URL=http://127.0.0.1:8080 OHX_UI_ADMIN_USER=… OHX_UI_ADMIN_PASSWORD=… \
//   OHX_UI_VIEWER_USER=… OHX_UI_VIEWER_PASSWORD=… OHX_UI_PATIENT_REFERENCE=Patient/abc OHX_UI_TARGET_NAME="local hfs" \
//   OHX_UI_APP_PROVIDER=withings OHX_UI_SCREENSHOT=/tmp/overview.png [OHX_UI_TIMEOUT_MS=120000] [CHROMIUM=/usr/bin/chromium] \
//   [OHX_UI_WITHINGS_ACCOUNT=<simulator userid: picked in the consent page's "Account" list>] node tests/browser/ui.mjs`
// Steps (each asserted): OIDC sign-in as the org admin through the provider's login form (a wrong password first); the
// overview; adding the patient (already there, on a re-run: opened instead); connecting the provider (its consent page:
// "Allow"; the gateway's "Connected" page; its link back to the UI); the link active; polling the patient's page (its
// Refresh button) until a sync run started after the Connect click succeeded and the patient's delivered count is > 0;
// a screenshot of the overview; sign out (through the issuer's logout); sign-in as the viewer: the patient listed, no
// write buttons; the API refuses the viewer's POST /api/v1/patients (403 problem+json).
// Locators are by role and label (an accessibility check too). OHX_UI_TIMEOUT_MS bounds each wait and navigation.
// Exit 1 with the failed step on stderr (and a screenshot beside OHX_UI_SCREENSHOT, *.failed.png), 2 on missing env;
// on success one JSON line on stdout with facts and step timings (progress lines go to stderr).

import { chromium } from 'playwright-core';

function need(name) {
  const v = process.env[name];
  if (!v) {
    console.error(`ui.mjs: missing env ${name}`);
    process.exit(2);
  }
  return v;
}

const BASE = need('OHX_UI_URL').replace(/\/+$/, '');
const UI = `${BASE}/ui/`;
const ADMIN = [need('OHX_UI_ADMIN_USER'), need('OHX_UI_ADMIN_PASSWORD')];
const VIEWER = [need('OHX_UI_VIEWER_USER'), need('OHX_UI_VIEWER_PASSWORD')];
const REFERENCE = need('OHX_UI_PATIENT_REFERENCE');
const TARGET = need('OHX_UI_TARGET_NAME');
const PROVIDER = need('OHX_UI_APP_PROVIDER');
const SCREENSHOT = need('OHX_UI_SCREENSHOT');
const ACCOUNT = process.env.OHX_UI_WITHINGS_ACCOUNT || ''; // the account to pick on the consent page, if several
const TIMEOUT = Number(process.env.OHX_UI_TIMEOUT_MS || 120000);
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
if (!(TIMEOUT > 0)) {
  console.error('ui.mjs: OHX_UI_TIMEOUT_MS must be a positive number of milliseconds');
  process.exit(2);
}
const ACTION_TIMEOUT = Math.min(30000, TIMEOUT);

const exact = (text) => new RegExp(`^\\s*${text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}\\s*$`);
const timings = {};
const facts = {};
const pageErrors = [];
let page;

class StepError extends Error {}
function check(ok, message) {
  if (!ok) throw new StepError(message);
}

async function step(name, fn) {
  const started = Date.now();
  try {
    await fn();
  } catch (err) {
    const shot = SCREENSHOT.replace(/(\.png)?$/, '.failed.png');
    await page?.screenshot({ path: shot, fullPage: true }).catch(() => {});
    console.error(`ui.mjs: step "${name}" failed: ${err instanceof StepError ? err.message : err.stack || err}`);
    console.error(`ui.mjs: page ${page?.url()}; screenshot ${shot}`);
    if (pageErrors.length) console.error(`ui.mjs: errors in the page: ${pageErrors.join(' | ')}`);
    throw err;
  }
  timings[name] = Date.now() - started;
  console.error(`ui.mjs: ok ${name} (${timings[name]} ms)`);
}

const mainNav = () => page.getByRole('navigation', { name: 'Main' });
const button = (name, scope = page) => scope.getByRole('button', { name: exact(name) });

/** Signs in through the UI's OIDC button and the provider's login form (with `tryWrong`, a wrong password first). */
async function oidcSignIn([user, password], role, tryWrong = false) {
  await page.goto(UI);
  await button('Sign in with your organization').click();
  await page.waitForURL((u) => !u.href.startsWith(BASE));
  const username = page.getByLabel('Username');
  await username.waitFor();
  if (tryWrong) {
    await username.fill(user);
    await page.getByLabel('Password').fill(`${password}-wrong`);
    const reloaded = page.waitForEvent('domcontentloaded');
    await button('Sign in').click();
    await reloaded;
    await page.getByRole('alert').filter({ hasText: 'Wrong username or password' }).waitFor();
  }
  await username.fill(user);
  await page.getByLabel('Password').fill(password);
  // The next document: the UI (after the redirects), or the login form again with an error.
  const loaded = page.waitForEvent('domcontentloaded');
  await button('Sign in').click();
  await loaded;
  if (!page.url().startsWith(UI)) {
    const refused = page.getByRole('alert');
    if (await refused.count()) check(false, `the provider refused ${user}: ${(await refused.first().textContent()).trim()}`);
    await page.waitForURL((u) => u.href.startsWith(UI));
  }
  await button('Sign out').waitFor();
  const account = await page.getByRole('banner').textContent();
  check(account.includes(role.replace('_', ' ')), `signed in as ${user}, the header should name the role ${role}: ${account}`);
}

async function openPatient() {
  await mainNav().getByRole('link', { name: 'Patients' }).click();
  await page.getByRole('heading', { level: 1, name: 'Patients' }).waitFor();
  await page.getByRole('link', { name: exact(REFERENCE) }).click();
  await page.getByRole('heading', { level: 1, name: `Patient ${REFERENCE}` }).waitFor();
}

/** Clicks the patient page's Refresh and waits until what it reloads is shown (the page is no longer aria-busy). */
async function refreshPatient() {
  const answers = ['/api/v1/links?', '/api/v1/delivery-status']
    .map((p) => page.waitForResponse((r) => r.url().includes(p)).then(() => null, (err) => err));
  await button('Refresh').click();
  const failed = (await Promise.all(answers)).find(Boolean);
  if (failed) throw failed;
  await page.waitForFunction(() => !document.querySelector('main [aria-busy="true"]'));
}

let browser;
try {
  browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: ['--no-sandbox'] });
} catch (err) {
  console.error(`ui.mjs: cannot start ${CHROMIUM}: ${err.message}`);
  process.exit(1);
}
const totalStart = Date.now();
let exitCode = 1;
try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  context.setDefaultTimeout(ACTION_TIMEOUT);
  context.setDefaultNavigationTimeout(TIMEOUT);
  page = await context.newPage();
  page.on('pageerror', (err) => pageErrors.push(err.message));

  await step('sign in as admin (OIDC)', () => oidcSignIn(ADMIN, 'org_admin', true));

  await step('overview', async () => {
    await page.getByRole('heading', { level: 1, name: 'Overview' }).waitFor();
    for (const h of ['Links by status', 'Last sync', 'Dead letters', 'Delivery failures', 'EHR targets']) {
      await page.getByRole('heading', { level: 2, name: h }).waitFor();
    }
    const targets = page.getByRole('region', { name: 'EHR targets' });
    await targets.getByRole('rowheader', { name: exact(TARGET) }).waitFor();
  });

  await step('add patient', async () => {
    await mainNav().getByRole('link', { name: 'Patients' }).click();
    await page.getByRole('heading', { level: 1, name: 'Patients' }).waitFor();
    await button('Add patient').click();
    await page.getByLabel('EHR target').selectOption({ label: TARGET });
    await page.getByLabel('Patient reference').fill(REFERENCE);
    await button('Save patient').click();
    const opened = page.getByRole('heading', { level: 1, name: `Patient ${REFERENCE}` });
    const refused = page.getByRole('alert');
    await opened.or(refused).first().waitFor();
    if (!(await opened.isVisible())) {
      const text = await refused.first().textContent();
      check(/already has a patient/.test(text), `adding the patient failed: ${text}`);
      facts.patient_existed = true; // a re-run on the same stack
      await openPatient();
    }
    facts.patient_id = decodeURIComponent(new URL(page.url()).hash.split('/')[2] || '');
    check(/^[0-9a-f-]{36}$/.test(facts.patient_id), `the patient page's address names no patient id: ${page.url()}`);
  });

  await step(`connect ${PROVIDER}`, async () => {
    const select = page.getByLabel('Provider app');
    await select.locator('option').first().waitFor({ state: 'attached' });
    const labels = await select.getByRole('option').allTextContents();
    const label = labels.find((l) => l.startsWith(`${PROVIDER} (`));
    check(label, `no ${PROVIDER} provider app to pick, options: ${labels.join(', ')}`);
    await select.selectOption({ label });
    facts.connect_at = new Date().toISOString();
    await button('Connect').click();
    await page.waitForURL((u) => !u.href.startsWith(UI));
    const allow = button('Allow');
    const callback = (u) => u.pathname === `/oauth/${PROVIDER}/callback`;
    // The provider's consent page, unless it sent the browser straight back to the gateway.
    const first = await Promise.race([
      allow.waitFor().then(() => 'consent', () => null),
      page.waitForURL(callback).then(() => 'callback', () => null),
    ]);
    check(first, `neither the ${PROVIDER} consent page (an "Allow" button) nor the gateway's callback came up`);
    facts.consent_page = first === 'consent';
    if (facts.consent_page) {
      if (ACCOUNT) {
        const account = page.getByLabel('Account');
        check(await account.count(), `the consent page has no "Account" choice to pick ${ACCOUNT} in`);
        await account.selectOption(ACCOUNT);
      }
      await allow.click();
      await page.waitForURL(callback);
    } else {
      console.error(`ui.mjs: warning: ${PROVIDER} showed no consent page (no "Allow" button): it redirected at once`);
    }
    const heading = page.getByRole('heading', { level: 1 });
    await heading.waitFor();
    const title = (await heading.textContent()).trim();
    const said = (await page.locator('body').innerText()).trim().replace(/\s+/g, ' ');
    check(/^Connected/.test(title), `the gateway's callback page says "${title}": ${said}`);
    facts.connected_page = title;
  });

  await step('back to the UI', async () => {
    const back = page.locator('a[href$="/ui/"], a[href$="/ui"]');
    check(await back.count() > 0, 'the gateway\'s "Connected" page has no link back to /ui/');
    await back.first().click();
    await page.waitForURL((u) => u.href.startsWith(UI));
    await button('Sign out').waitFor();
    const heading = page.getByRole('heading', { level: 1, name: `Patient ${REFERENCE}` });
    await heading.or(page.getByRole('heading', { level: 1, name: 'Overview' })).first().waitFor();
    if (!(await heading.isVisible())) await openPatient();
  });

  const links = () => page.getByRole('region', { name: 'Provider links' });
  await step('link active', async () => {
    const active = links().getByRole('row', { name: new RegExp(`\\b${PROVIDER}\\b`) }).getByRole('cell', { name: exact('active') });
    const deadline = Date.now() + TIMEOUT;
    while (!(await active.count())) {
      check(Date.now() < deadline, `no active ${PROVIDER} link after ${TIMEOUT} ms`);
      await page.waitForTimeout(1000);
      await refreshPatient();
    }
  });

  await step('sync succeeded and delivered', async () => {
    const runs = page.getByRole('table', { name: `Latest sync runs of the ${PROVIDER} link` });
    const delivery = page.getByRole('region', { name: 'Delivery' });
    const deadline = Date.now() + TIMEOUT;
    for (;;) {
      // Runs of this connection: started after the Connect click (a second of clock skew allowed).
      const succeeded = await runs.getByRole('row').evaluateAll((rows, since) => rows.filter((r) => {
        const started = Date.parse(r.querySelector('time')?.getAttribute('datetime') ?? '');
        const status = r.cells[2]?.textContent.trim(); // columns: Started, Trigger, Status, …
        return started >= since && (status === 'succeeded' || status === 'ok');
      }).length, Date.parse(facts.connect_at) - 1000);
      const row = delivery.getByRole('row', { name: new RegExp(TARGET.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')) });
      const delivered = (await row.count()) ? Number(await row.first().getByRole('cell').first().textContent()) : 0;
      if (succeeded > 0 && delivered > 0) {
        facts.delivered = delivered;
        break;
      }
      check(Date.now() < deadline, `after ${TIMEOUT} ms: ${succeeded} sync runs succeeded since the connect, ${delivered} delivered`);
      await page.waitForTimeout(2000);
      await refreshPatient();
    }
  });

  await step('overview screenshot', async () => {
    await mainNav().getByRole('link', { name: 'Overview' }).click();
    await page.getByRole('heading', { level: 1, name: 'Overview' }).waitFor();
    await page.getByText('Loading…').first().waitFor({ state: 'detached' }).catch(() => {});
    await page.waitForFunction(() => !document.querySelector('[aria-busy="true"]'));
    const activeCount = page.getByRole('region', { name: 'Links by status' }).getByRole('row', { name: /active/ }).getByRole('cell');
    check(Number(await activeCount.first().textContent()) >= 1, 'the overview counts no active link');
    await page.screenshot({ path: SCREENSHOT, fullPage: true });
  });

  await step('sign out', async () => {
    const visited = [];
    const onNav = (frame) => frame === page.mainFrame() && visited.push(frame.url());
    page.on('framenavigated', onNav);
    await button('Sign out').click();
    await button('Sign in with your organization').waitFor();
    page.off('framenavigated', onNav);
    check(page.url().startsWith(UI), `signed out, the browser should be back at ${UI}: ${page.url()}`);
    // RP-initiated logout: the issuer's session ends too (the viewer's sign-in below needs its login form).
    check(visited.some((u) => !u.startsWith(BASE)), `signing out did not go through the issuer: ${visited.join(', ')}`);
  });

  await step('sign in as viewer (OIDC)', () => oidcSignIn(VIEWER, 'viewer'));

  await step('viewer: read only', async () => {
    await mainNav().getByRole('link', { name: 'Patients' }).click();
    await page.getByRole('link', { name: exact(REFERENCE) }).waitFor();
    check(await button('Add patient').count() === 0, 'a viewer is offered "Add patient"');
    await openPatient();
    await page.getByRole('region', { name: 'Provider links' }).getByRole('cell', { name: exact('active') }).first().waitFor();
    for (const name of ['Connect', 'Sync', 'Disconnect', 'Save consent']) {
      check(await button(name).count() === 0, `a viewer is offered "${name}"`);
    }
    await mainNav().getByRole('link', { name: 'EHR targets' }).click();
    await page.getByRole('rowheader', { name: exact(TARGET) }).waitFor();
    check(await button('Add target').count() === 0, 'a viewer is offered "Add target"');
    await mainNav().getByRole('link', { name: 'Dead letters' }).click();
    await page.getByRole('heading', { level: 1, name: 'Dead letters' }).waitFor();
    check(await page.getByRole('button', { name: /^Re-drive/ }).count() === 0, 'a viewer is offered "Re-drive"');
  });

  await step('API refuses the viewer', async () => {
    const answer = await page.evaluate(async (reference) => {
      const { token } = JSON.parse(sessionStorage.getItem('ohx.session'));
      const headers = { Authorization: `Bearer ${token}`, 'Content-Type': 'application/json', Accept: 'application/json' };
      const targets = await (await fetch('/api/v1/ehr-targets', { headers })).json();
      const res = await fetch('/api/v1/patients', {
        method: 'POST',
        headers,
        body: JSON.stringify({ ehr_target_id: targets.items[0].id, ehr_patient_reference: `${reference}-viewer` }),
      });
      return { status: res.status, type: res.headers.get('content-type'), body: await res.text() };
    }, REFERENCE);
    check(answer.status === 403, `POST /api/v1/patients as the viewer answered ${answer.status}: ${answer.body}`);
    check(/problem\+json/.test(answer.type), `the 403 is not a problem document: ${answer.type}`);
  });

  await step('no errors in the page', async () => check(pageErrors.length === 0, `uncaught: ${pageErrors.join(' | ')}`));
  process.stdout.write(`${JSON.stringify({ ok: true, ...facts, screenshot: SCREENSHOT, total_ms: Date.now() - totalStart, steps: timings })}\n`);
  exitCode = 0;
} catch (err) {
  if (!page) console.error(`ui.mjs: ${err.stack || err}`); // failures inside a step are reported by step()
} finally {
  await browser.close();
}
process.exit(exitCode);
