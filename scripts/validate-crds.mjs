// Validates custom resources against their CRDs' OpenAPI schemas, offline, with the compiled
// validators of the npm packages @kubernetes-models/keda (KEDA's keda.sh/v1alpha1 API types)
// and @kubernetes-models/prometheus-operator (monitoring.coreos.com/v1).
//
//   node scripts/validate-crds.mjs NODE_MODULES_DIR CRDS_JSON
//
// CRDS_JSON is written by `scripts/deploy-lint.py split`: [{file, doc}, ...]. The validators
// check types, enums and required fields as the API server would; like a CRD schema without
// `additionalProperties: false`, they do not reject unknown fields (deploy-lint.py checks the
// free-form kafka trigger metadata by name). Prints one line per resource; exits 1 on a failure.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const [modulesDir, crdsFile] = process.argv.slice(2);
if (!modulesDir || !crdsFile) {
  console.error("usage: validate-crds.mjs NODE_MODULES_DIR CRDS_JSON");
  process.exit(2);
}

const models = {
  "keda.sh/v1alpha1/ScaledObject": ["@kubernetes-models/keda", "keda.sh/v1alpha1/ScaledObject.js", "ScaledObject"],
  "keda.sh/v1alpha1/TriggerAuthentication": ["@kubernetes-models/keda", "keda.sh/v1alpha1/TriggerAuthentication.js", "TriggerAuthentication"],
  "monitoring.coreos.com/v1/ServiceMonitor": ["@kubernetes-models/prometheus-operator", "monitoring.coreos.com/v1/ServiceMonitor.js", "ServiceMonitor"],
  "monitoring.coreos.com/v1/PrometheusRule": ["@kubernetes-models/prometheus-operator", "monitoring.coreos.com/v1/PrometheusRule.js", "PrometheusRule"],
};

const items = JSON.parse(readFileSync(crdsFile, "utf8"));
let failed = 0;
for (const { file, doc } of items) {
  const key = `${doc.apiVersion}/${doc.kind}`;
  const where = `${file}: ${doc.kind}/${doc.metadata?.name}`;
  const model = models[key];
  if (!model) {
    console.log(`  FAIL ${where}: no schema for ${key}`);
    failed++;
    continue;
  }
  const [pkg, path, cls] = model;
  const mod = await import(pathToFileURL(join(modulesDir, pkg, path)).href);
  try {
    new mod[cls](doc).validate();
    console.log(`  ok   ${where}`);
  } catch (e) {
    console.log(`  FAIL ${where}: ${e.message}`);
    failed++;
  }
}
console.log(`crds: ${items.length - failed} valid, ${failed} invalid`);
process.exit(failed ? 1 : 0);
