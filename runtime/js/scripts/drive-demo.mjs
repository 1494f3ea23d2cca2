// Drives the vera-run demo page in headless Chromium for tests/test_demo.py:
//   node scripts/drive-demo.mjs URL REQUEST.json RESULT.json SCREENSHOT.png
// REQUEST: {"sentences": [...]}. Types each sentence into the text box, then asks window.veraDemo for every
// task's scores; records every URL the page requested; writes RESULT and a screenshot of the page.

import { readFile, writeFile } from 'node:fs/promises';

import { findChromium } from '../test/chromium.mjs';

const [url, requestPath, resultPath, screenshotPath] = process.argv.slice(2);

function chromium() {
  const found = findChromium();
  if (!found) throw new Error('no chromium: apt-get install chromium (or set CHROMIUM)');
  return found;
}

const { default: puppeteer } = await import('puppeteer-core');
const request = JSON.parse(await readFile(requestPath, 'utf8'));
const browser = await puppeteer.launch({ executablePath: chromium(), headless: true, args: ['--no-sandbox'] });
try {
  const page = await browser.newPage();
  await page.setViewport({ width: 900, height: 720 });
  const requested = [];
  const problems = [];
  page.on('request', (r) => requested.push(r.url()));
  page.on('console', (m) => { if (m.type() === 'error') problems.push(m.text()); });
  page.on('pageerror', (e) => problems.push(String(e)));
  await page.goto(url);
  await page.waitForFunction('window.veraDemo !== undefined', { timeout: 60_000 });
  await page.evaluate(() => window.veraDemo.ready);
  const tasks = await page.evaluate(() => window.veraDemo.tasks());
  const results = [];
  for (const sentence of request.sentences) {
    await page.click('#text', { clickCount: 3 });
    await page.keyboard.press('Backspace');
    await page.type('#text', sentence);
    await page.waitForFunction((n) => document.querySelectorAll('#tasks tbody tr').length === n, {}, tasks.length);
    const shown = await page.$$eval('#tasks tbody tr', (rows) => rows.map((r) => [r.dataset.task, r.querySelector('.prediction').textContent]));
    const byTask = {};
    for (const task of tasks) byTask[task] = await page.evaluate((t, s) => window.veraDemo.run(s, t), task, sentence);
    const all = await page.evaluate((s) => window.veraDemo.runAll(s), sentence);
    results.push({ sentence, shown, byTask, all });
  }
  await page.click('#tasks tbody tr:last-child');
  await page.waitForFunction(() => document.querySelector('#timing').textContent.includes('alone'));
  const timing = await page.$eval('#timing', (e) => e.textContent);
  await page.screenshot({ path: screenshotPath, fullPage: true });
  await writeFile(resultPath, JSON.stringify({ tasks, results, requested, problems, timing }));
} finally {
  await browser.close();
}
