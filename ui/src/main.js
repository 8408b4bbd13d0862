// Entry point: reads /ui/config.json, finishes an OIDC sign-in when coming back from the
// issuer, and renders the application.

import { render } from 'preact';
import { configure } from './api.js';
import { App } from './app.js';
import { completeOidcSignIn, currentSession, loadConfig, takeReturn } from './auth.js';
import { html } from './ui.js';

const root = document.getElementById('app');

async function start() {
  let config;
  try {
    config = await loadConfig();
  } catch (err) {
    render(html`<main><h1>ohx configuration</h1><p role="alert">The UI cannot start: ${err.message}.</p></main>`, root);
    return;
  }
  configure({ base: config.api_base });
  let error = null;
  try {
    await completeOidcSignIn(config.oidc);
  } catch (err) {
    error = err;
  }
  // Back from a provider's consent page (the gateway links to /ui/): return to where it started.
  const back = takeReturn();
  if (back && currentSession() && (!location.hash || location.hash === '#/')) history.replaceState(null, '', `/ui/${back}`);
  root.textContent = '';
  render(html`<${App} config=${config} error=${error} />`, root);
}

start();
