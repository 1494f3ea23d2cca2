// Where the tests' headless Chromium is: $CHROMIUM, else the first of the usual names on PATH; null if none.

import { execFileSync } from 'node:child_process';

export function findChromium() {
  if (process.env.CHROMIUM) return process.env.CHROMIUM;
  for (const name of ['chromium', 'chromium-browser', 'google-chrome']) {
    try {
      return execFileSync('sh', ['-c', `command -v ${name}`], { encoding: 'utf8' }).trim();
    } catch { /* not this one */ }
  }
  return null;
}
