// Drives a real VS Code (code-server in Debian's Chromium, through playwright-core) the way a user does:
// keys, the command palette, the editor's own ghost text. Started by tests/test_vscode_client.py in the
// repository, which starts code-server with this extension installed and the real server (scripted
// model); this script writes what it saw as JSON (OFFPILOT_TEST_RESULT) and the test asserts on it.
import { createRequire } from 'node:module';
import fs from 'node:fs';
import path from 'node:path';

const env = process.env;
const require = createRequire(import.meta.url);
const { chromium } = require(env.OFFPILOT_PLAYWRIGHT);
const folder = env.OFFPILOT_TEST_DIR;
const caps = JSON.parse(env.OFFPILOT_TEST_CAPS || '{}');
const result = { scenarios: {}, times_ms: {}, error: null, console_errors: [] };
const started = Date.now();
const mod = 'Control';
let currentPage = null;

function sleep(ms) { return new Promise((resolve) => setTimeout(resolve, ms)); }

async function until(what, fn, timeoutMs = 20000, everyMs = 100) {
  const end = Date.now() + timeoutMs;
  let last;
  while (Date.now() < end) {
    last = await fn();
    if (last) return last;
    await sleep(everyMs);
  }
  throw new Error(`timed out after ${timeoutMs} ms waiting for ${what} (last: ${JSON.stringify(last)})`);
}

/** The document text of the visible editor, line by line, from its rendered lines (small files only),
 * without the ghost text drawn inside them. */
async function editorLines(page) {
  return page.evaluate(() => {
    const editor = document.querySelector('.editor-instance .monaco-editor') ?? document.querySelector('.monaco-editor');
    if (!editor) return null;
    const textOf = (line) => {
      let text = '';
      const walker = document.createTreeWalker(line, NodeFilter.SHOW_TEXT);
      for (let node = walker.nextNode(); node; node = walker.nextNode()) {
        if (!node.parentElement.closest('[class*="ghost-text"]')) text += node.textContent;
      }
      return text.replace(/\u00a0/g, ' ');
    };
    return [...editor.querySelectorAll('.view-lines .view-line')]
      .map((el) => ({ top: parseFloat(el.style.top || '0'), text: textOf(el) }))
      .sort((a, b) => a.top - b.top)
      .map((l) => l.text);
  });
}

/** The ghost text the editor shows: the part inside the cursor's line (`.ghost-text-decoration`) and the
 * lines drawn below it (a view zone). */
async function ghost(page) {
  return page.evaluate(() => {
    const editor = document.querySelector('.editor-instance .monaco-editor') ?? document.querySelector('.monaco-editor');
    if (!editor) return null;
    const clean = (el) => el.textContent.replace(/\u00a0/g, ' ');
    const inline = [...editor.querySelectorAll('.view-lines .ghost-text-decoration')].map(clean);
    const below = [...editor.querySelectorAll('.view-zones .view-line')].filter((el) => el.querySelector('[class*="ghost-text"]') || el.closest('[class*="ghost-text"]'))
      .map((el) => ({ top: parseFloat(el.closest('[style*="top"]')?.style.top || '0'), text: clean(el) }))
      .sort((a, b) => a.top - b.top).map((l) => l.text);
    return inline.length || below.length ? { inline: inline.join(''), below } : null;
  });
}

/** The text of the extension's explanation panel (a webview: an iframe inside an iframe). */
async function explanation(page) {
  for (const frame of page.frames()) {
    const text = await frame.evaluate(() => document.querySelector('body.offpilot-explanation')?.innerText ?? null).catch(() => null);
    if (text) return text;
  }
  return null;
}

async function cursor(page) {
  // The status bar's "Ln 2, Col 12".
  return page.evaluate(() => {
    const el = [...document.querySelectorAll('.statusbar-item')].find((e) => /Ln \d+, Col \d+/.test(e.textContent));
    return el ? el.textContent.trim() : null;
  });
}

async function offpilotStatus(page) {
  return page.evaluate(() => {
    const el = [...document.querySelectorAll('.statusbar-item')].find((e) => /offpilot/.test(e.textContent));
    return el ? el.textContent.trim() : null;
  });
}

async function command(page, title) {
  await page.keyboard.press('F1');
  const input = page.locator('.quick-input-widget input').first();
  await input.waitFor({ state: 'visible', timeout: 10000 });
  await input.fill(`>${title}`);
  // The first row must be the command asked for, not a fuzzy neighbour.
  await until(`the palette to offer "${title}"`, async () => page.evaluate((t) => {
    const row = document.querySelector('.quick-input-widget .monaco-list-row[data-index="0"]');
    return row && row.textContent.includes(t);
  }, title), 10000);
  await page.keyboard.press('Enter');
  await page.locator('.quick-input-widget').first().waitFor({ state: 'hidden', timeout: 10000 }).catch(() => {});
}

async function openFile(page, name) {
  await page.keyboard.press(`${mod}+P`);
  const input = page.locator('.quick-input-widget input').first();
  await input.waitFor({ state: 'visible', timeout: 10000 });
  await input.fill(name);
  await until(`quick open to list ${name}`, async () => page.evaluate((n) => {
    const row = document.querySelector('.quick-input-widget .monaco-list-row[data-index="0"]');
    return row && row.textContent.includes(n);
  }, name), 10000);
  await page.keyboard.press('Enter');
  await until(`the editor tab of ${name}`, async () => page.evaluate((n) => {
    const tab = document.querySelector('.tab.active');
    return tab && tab.getAttribute('aria-label')?.startsWith(n) && document.activeElement?.closest('.monaco-editor') !== null;
  }, name), 10000);
}

async function save(page, name) {
  await page.keyboard.press(`${mod}+S`);
  await until(`${name} to be saved`, async () => page.evaluate(() => {
    const tab = document.querySelector('.tab.active');
    return tab && !tab.classList.contains('dirty');
  }), 10000);
}

/** Tick or untick a boolean setting in VS Code's Settings editor, as a user does. Returns the row's text
 * (its description comes from package.json) and the new state. */
async function toggleSetting(page, id, description, file) {
  await page.keyboard.press(`${mod}+Comma`);
  await page.locator('.settings-editor').first().waitFor({ state: 'visible', timeout: 15000 });
  await sleep(500);  // the search box takes the focus when the editor opens
  await page.keyboard.type(id);
  const row = page.locator('.settings-editor .setting-item-bool', { hasText: description }).first();
  await row.waitFor({ state: 'visible', timeout: 15000 });
  const text = (await row.textContent()).replace(/\s+/g, ' ').trim();
  const box = row.locator('.setting-value-checkbox').first();
  const was = await box.getAttribute('aria-checked');
  await box.click();
  await until('the checkbox to change', async () => (await box.getAttribute('aria-checked')) !== was, 5000);
  const now = await box.getAttribute('aria-checked');
  await sleep(500);  // VS Code writes settings.json; the extension gets the change and tells the server
  await page.keyboard.press(`${mod}+W`);  // close the Settings editor
  await openFile(page, file);
  await page.keyboard.press(`${mod}+End`);
  return { text, checked: now };
}

const only = env.OFFPILOT_TEST_ONLY ? env.OFFPILOT_TEST_ONLY.split(',') : null;
let shots = 0;
/** With OFFPILOT_TEST_DEBUG=1, a screenshot at each call, for working on this script. */
async function debugShot(page, name) {
  if (env.OFFPILOT_TEST_DEBUG !== '1') return;
  await page.screenshot({ path: path.join(env.OFFPILOT_TEST_ARTIFACTS, `step-${String(++shots).padStart(2, '0')}-${name}.png`) });
}

async function scenario(name, fn) {
  if (only && !only.includes(name)) return;
  const steps = [];
  const part = { ok: false, error: null, steps };
  result.scenarios[name] = part;
  const t0 = Date.now();
  try {
    await fn(steps);
    part.ok = true;
  } catch (error) {
    part.error = String(error?.stack ?? error);
    if (currentPage) {
      const shot = path.join(env.OFFPILOT_TEST_ARTIFACTS, `failed-${name}.png`);
      await currentPage.screenshot({ path: shot }).catch(() => {});
      part.screenshot = shot;
    }
    await currentPage?.keyboard.press('Escape').catch(() => {});
  }
  result.times_ms[name] = Date.now() - t0;
}

async function snapshot(page, steps, name, extra = {}) {
  steps.push({ name, lines: await editorLines(page), ghost: await ghost(page), cursor: await cursor(page), ...extra });
}

async function main() {
  const browser = await chromium.launch({
    executablePath: env.OFFPILOT_CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage'],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
    currentPage = page;
    page.on('console', (msg) => { if (msg.type() === 'error') result.console_errors.push(msg.text().slice(0, 500)); });
    await page.goto(`${env.OFFPILOT_TEST_URL}/?folder=${encodeURIComponent(folder)}`);
    await page.locator('.monaco-workbench').waitFor({ timeout: 60000 });
    result.times_ms.workbench = Date.now() - started;
    // The extension starts the server when VS Code has started; the status bar says when the model is ready.
    result.status_at_start = await until('the offpilot status bar item to say ready',
      async () => { const s = await offpilotStatus(page); return s && /offpilot fake/.test(s) && !/:/.test(s) ? s : null; }, 60000, 250);
    result.times_ms.ready = Date.now() - started;

    await scenario('accept_all', async (steps) => {
      await openFile(page, 'demo_accept.py');
      await page.keyboard.press(`${mod}+End`);
      await snapshot(page, steps, 'before');
      await command(page, 'Trigger Inline Suggestion');
      await until('ghost text', () => ghost(page));
      await snapshot(page, steps, 'ghost shown');
      fs.mkdirSync(path.dirname(env.OFFPILOT_TEST_SCREENSHOT), { recursive: true });
      await page.screenshot({ path: env.OFFPILOT_TEST_SCREENSHOT });
      await page.keyboard.press('Tab');
      await until('the ghost text to go', async () => (await ghost(page)) === null);
      await snapshot(page, steps, 'accepted');
      await save(page, 'demo_accept.py');
      result.status_after_completion = await offpilotStatus(page);
    });

    await scenario('accept_partial', async (steps) => {
      await openFile(page, 'demo_partial.py');
      await page.keyboard.press(`${mod}+Home`);
      await page.keyboard.press('ArrowDown');
      await page.keyboard.press('End');
      await command(page, 'Trigger Inline Suggestion');
      await until('ghost text', () => ghost(page));
      await snapshot(page, steps, 'ghost shown');
      await page.keyboard.press(`${mod}+ArrowRight`);  // VS Code's acceptNextWord
      await until('a word accepted', async () => ((await editorLines(page)) ?? [])[1] !== '    ');
      await sleep(300);
      await snapshot(page, steps, 'after accept word');
      await page.keyboard.press(`${mod}+Alt+ArrowRight`);  // acceptNextLine, bound by this extension
      const afterWord = steps[steps.length - 1].lines;
      await until('a line accepted', async () => JSON.stringify(await editorLines(page)) !== JSON.stringify(afterWord));
      await sleep(300);
      await snapshot(page, steps, 'after accept line');
      // Tab takes the rest. Where the rest starts with indentation at the start of a line, VS Code's
      // first Tab may indent instead; a user presses it again.
      let tabs = 0;
      while (tabs < 3 && (await ghost(page)) !== null) {
        await page.keyboard.press('Tab');
        tabs += 1;
        await until('the ghost text to change', async () => JSON.stringify(await ghost(page)) !== JSON.stringify(steps[steps.length - 1].ghost), 3000).catch(() => {});
        await snapshot(page, steps, `after Tab ${tabs}`);
      }
      await until('the ghost text to go', async () => (await ghost(page)) === null, 3000);
      steps.push({ name: 'after Tab', tabs, lines: await editorLines(page) });
      await save(page, 'demo_partial.py');
    });

    await scenario('settings_change', async (steps) => {
      // workspace/didChangeConfiguration: completions off, then on again, without a restart. The file
      // opens only once completions are off, so no suggestion for it exists from before (VS Code may ask
      // on its own when the cursor moves, and the server still serves the rest of a shown suggestion).
      const off = await toggleSetting(page, 'offpilot.completion.enabled', 'Offer inline completions.', 'demo_settings.py');
      steps.push({ name: 'settings row', ...off });
      await command(page, 'Trigger Inline Suggestion');
      await sleep(3000);  // the scripted model answers in under a second when enabled
      await snapshot(page, steps, 'disabled');
      const on = await toggleSetting(page, 'offpilot.completion.enabled', 'Offer inline completions.', 'demo_settings.py');
      steps.push({ name: 'settings row again', ...on });
      await command(page, 'Trigger Inline Suggestion');
      await until('ghost text', () => ghost(page));
      await snapshot(page, steps, 'enabled again');
      await page.keyboard.press('Escape');
    });

    if (caps.explain) {
      await scenario('explain', async (steps) => {
        await openFile(page, 'demo_actions.py');
        await page.keyboard.press(`${mod}+Home`);
        await page.keyboard.press('ArrowDown');  // inside the function: the server takes all of it
        await command(page, 'offpilot: Explain the Selection');
        const text = await until('the explanation panel', () => explanation(page), 60000, 250);
        steps.push({ name: 'panel', text, tab: await page.evaluate(() => [...document.querySelectorAll('.tab')].map((t) => t.getAttribute('aria-label'))) });
      });
    }

    if (caps.refactor) {
      await scenario('refactor', async (steps) => {
        await openFile(page, 'demo_actions.py');
        const before = await editorLines(page);
        await page.keyboard.press(`${mod}+A`);
        await command(page, 'offpilot: Refactor the Selection...');
        const input = page.locator('.quick-input-widget input').first();
        await input.waitFor({ state: 'visible', timeout: 10000 });
        await input.fill(env.OFFPILOT_TEST_INSTRUCTION || 'swap the operands');
        await page.keyboard.press('Enter');
        // The server's edit asks for confirmation (a change annotation): VS Code shows it in its Refactor
        // Preview with the change unticked; the user ticks it and presses Apply.
        const how = await until('the refactored text or the Refactor Preview', async () => {
          if (JSON.stringify(await editorLines(page)) !== JSON.stringify(before)) return 'applied';
          return (await page.locator('.bulk-edit-panel .edit-checkbox').first().isVisible().catch(() => false)) ? 'preview' : null;
        }, 60000, 250);
        steps.push({ name: 'edit arrived', how });
        await debugShot(page, 'refactor-edit-arrived');
        if (how === 'preview') {
          const box = page.locator('.bulk-edit-panel .edit-checkbox').first();
          if (!(await box.isChecked().catch(() => false))) await box.click();
          await page.locator('.bulk-edit-panel .buttons .monaco-button', { hasText: /^Apply$/ }).first().click();
          await until('the refactored text', async () => JSON.stringify(await editorLines(page)) !== JSON.stringify(before), 20000, 250);
        }
        await snapshot(page, steps, 'refactored');
        await save(page, 'demo_actions.py');
      });
    }

    if (caps.codeAction) {
      await scenario('code_action', async (steps) => {
        await openFile(page, 'demo_code_action.py');
        await page.keyboard.press(`${mod}+Home`);
        await page.keyboard.press('ArrowDown');
        await page.keyboard.press(`${mod}+A`);
        // The light bulb shows with a selection; its menu lists every kind of action (Quick Fix... lists
        // only quick fixes, and explain is neither a quick fix nor a refactoring).
        const bulb = page.locator('.monaco-editor .lightBulbWidget').first();
        await bulb.waitFor({ state: 'visible', timeout: 20000 });
        await debugShot(page, 'code-action-bulb');
        await bulb.click();
        const items = await until('the code action menu', async () => {
          const rows = await page.evaluate(() => [...document.querySelectorAll('.action-widget .monaco-list-row')]
            .map((r) => r.textContent.trim()));
          return rows.length ? rows : null;
        }, 20000, 250);
        await debugShot(page, 'code-action-menu');
        steps.push({ name: 'menu', items });
        const pick = items.findIndex((t) => /explain/i.test(t));
        if (pick < 0) throw new Error(`no Explain action in ${JSON.stringify(items)}`);
        await page.locator('.action-widget .monaco-list-row').nth(pick).click();
        const text = await until('the explanation panel after the code action', async () => {
          const t = await explanation(page);
          return t && t !== env.OFFPILOT_TEST_FIRST_EXPLANATION ? t : null;
        }, 60000, 250);
        steps.push({ name: 'panel', text });
      });
    }
  } finally {
    await browser.close();
  }
}

try {
  await main();
} catch (error) {
  result.error = String(error?.stack ?? error);
}
result.times_ms.total = Date.now() - started;
fs.writeFileSync(env.OFFPILOT_TEST_RESULT, JSON.stringify(result, null, 1));
