// Builds the UI into dist/: index.html, app.js (one ES module bundle), app.css.
// `npm run build`; `npm run watch` rebuilds on change. The gateway serves dist/ at /ui/ (OHX_UI_DIR).

import { copyFile, mkdir, rm } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import * as esbuild from 'esbuild';

const here = path.dirname(fileURLToPath(import.meta.url));
const src = path.join(here, 'src');
const dist = path.join(here, 'dist');
const watch = process.argv.includes('--watch');

await rm(dist, { recursive: true, force: true });
await mkdir(dist, { recursive: true });

const copyStatic = {
  name: 'copy-static',
  setup(build) {
    build.onEnd(async (result) => {
      if (result.errors.length) return;
      await copyFile(path.join(src, 'index.html'), path.join(dist, 'index.html'));
      console.log(`built ${path.relative(process.cwd(), dist)}/{index.html,app.js,app.css}`);
    });
  },
};

const options = {
  entryPoints: [{ in: path.join(src, 'main.js'), out: 'app' }, { in: path.join(src, 'app.css'), out: 'app' }],
  outdir: dist,
  bundle: true,
  format: 'esm',
  target: ['es2022'],
  minify: !watch,
  sourcemap: watch ? 'inline' : false,
  legalComments: 'none',
  logLevel: 'warning',
  plugins: [copyStatic],
};

if (watch) {
  const ctx = await esbuild.context(options);
  await ctx.watch();
  console.log('watching src/ …');
} else {
  await esbuild.build(options);
}
