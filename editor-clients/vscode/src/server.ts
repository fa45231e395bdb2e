// Pure helpers (no `vscode` import, so Node alone can run them): which command starts the server, and
// the shape of the settings the server receives.
import * as fs from 'fs';
import * as path from 'path';

/** Settings the extension itself reads; the server never sees them (it would warn "unknown setting"). */
export const CLIENT_ONLY_SECTIONS = ['server', 'trace'];

/** Split a command line into words the way a POSIX shell does for the simple cases: blanks separate
 * words, single quotes keep everything, double quotes keep all but `\"` and `\\`, a backslash outside
 * quotes keeps the next character. No expansion of any kind. */
export function splitCommandLine(line: string): string[] {
  const words: string[] = [];
  let word = '';
  let inWord = false;
  for (let i = 0; i < line.length; i++) {
    const c = line[i];
    if (c === "'") {
      const end = line.indexOf("'", i + 1);
      if (end < 0) throw new Error(`unterminated ' in ${JSON.stringify(line)}`);
      word += line.slice(i + 1, end);
      inWord = true;
      i = end;
    } else if (c === '"') {
      let j = i + 1;
      for (; j < line.length && line[j] !== '"'; j++) {
        if (line[j] === '\\' && (line[j + 1] === '"' || line[j + 1] === '\\')) j++;
        word += line[j];
      }
      if (j >= line.length) throw new Error(`unterminated " in ${JSON.stringify(line)}`);
      inWord = true;
      i = j;
    } else if (c === '\\' && i + 1 < line.length) {
      word += line[++i];
      inWord = true;
    } else if (/\s/.test(c)) {
      if (inWord) words.push(word);
      word = '';
      inWord = false;
    } else {
      word += c;
      inWord = true;
    }
  }
  if (inWord) words.push(word);
  return words;
}

export interface ServerCommand {
  command: string;
  args: string[];
  /** Where it came from, for the output channel and error messages. */
  source: string;
}

function isExecutable(file: string): boolean {
  try {
    fs.accessSync(file, fs.constants.X_OK);
    return fs.statSync(file).isFile();
  } catch {
    return false;
  }
}

/** The `offpilot` program inside a checkout's virtual environment (made by scripts/setup). */
export function venvProgram(root: string): string | undefined {
  const candidates = process.platform === 'win32'
    ? [path.join(root, '.venv', 'Scripts', 'offpilot.exe')]
    : [path.join(root, '.venv', 'bin', 'offpilot')];
  return candidates.find(isExecutable);
}

function onPath(name: string): string | undefined {
  for (const dir of (process.env.PATH ?? '').split(path.delimiter)) {
    if (dir && isExecutable(path.join(dir, name))) return path.join(dir, name);
  }
  return undefined;
}

/**
 * The command that starts `offpilot serve`, in this order:
 * 1. `offpilot.server.command` (an array: program and arguments; a string: a command line);
 * 2. `<offpilot.server.root>/.venv/bin/offpilot serve` (a relative root is taken from each workspace folder);
 * 3. `.venv/bin/offpilot serve` in a workspace folder or in one of its parent folders;
 * 4. `offpilot serve` from $PATH.
 * `${workspaceFolder}` in the command is replaced by the first workspace folder. Throws with a message
 * that says what to set when nothing is found.
 */
export function resolveServerCommand(configured: unknown, root: unknown, folders: string[]): ServerCommand {
  const first = folders[0] ?? process.cwd();
  const expand = (word: string) => word.split('${workspaceFolder}').join(first);
  let words: string[] = [];
  if (Array.isArray(configured)) {
    words = configured.map(String);
  } else if (typeof configured === 'string' && configured.trim() !== '') {
    words = splitCommandLine(configured);
  }
  if (words.length > 0) {
    let [program, ...args] = words.map(expand);
    // A relative path with a folder in it (".venv/bin/offpilot") means the first workspace folder's.
    if (!path.isAbsolute(program) && program.includes('/')) program = path.resolve(first, program);
    return { command: program, args, source: 'offpilot.server.command' };
  }
  if (typeof root === 'string' && root.trim() !== '') {
    const roots = path.isAbsolute(expand(root)) ? [expand(root)] : folders.map((f) => path.resolve(f, expand(root)));
    for (const r of roots) {
      const program = venvProgram(r);
      if (program) return { command: program, args: ['serve'], source: 'offpilot.server.root' };
    }
    throw new Error(`offpilot.server.root is ${JSON.stringify(root)}, but no .venv/bin/offpilot is there ` +
      `(run scripts/setup in the offpilot checkout, or set offpilot.server.command)`);
  }
  for (const folder of folders) {
    for (let dir = path.resolve(folder); ; dir = path.dirname(dir)) {
      const program = venvProgram(dir);
      if (program) return { command: program, args: ['serve'], source: `the .venv of ${dir}` };
      if (path.dirname(dir) === dir) break;
    }
  }
  const program = onPath(process.platform === 'win32' ? 'offpilot.exe' : 'offpilot');
  if (program) return { command: program, args: ['serve'], source: '$PATH' };
  throw new Error('no offpilot server found: set offpilot.server.command (e.g. ["/path/to/offpilot/.venv/bin/offpilot", "serve"]) ' +
    'or offpilot.server.root (the offpilot checkout, after scripts/setup)');
}

/**
 * The server's part of the `offpilot` settings as a nested object ({model: {path: ...}, completion: {...}}),
 * the shape lsp_server/config.py's merge() takes from initializationOptions and didChangeConfiguration.
 * `keys` are the contributed setting names without the `offpilot.` prefix ("model.path"); `get` reads one.
 */
export function serverSettings(keys: string[], get: (key: string) => unknown): Record<string, Record<string, unknown>> {
  const out: Record<string, Record<string, unknown>> = {};
  for (const key of keys) {
    const dot = key.indexOf('.');
    if (dot < 0) continue;
    const section = key.slice(0, dot);
    if (CLIENT_ONLY_SECTIONS.includes(section)) continue;
    const value = get(key);
    if (value === undefined) continue;
    (out[section] ??= {})[key.slice(dot + 1)] = value;
  }
  return out;
}

/** The status bar's text and tooltip lines for an `offpilot/status` reply. */
export function describeStatus(status: any): { text: string; icon: string; lines: string[]; error: boolean } {
  const state = String(status?.state ?? 'unknown');
  const model = typeof status?.model === 'string' && status.model !== ''
    ? path.basename(status.model).replace(/\.gguf$/i, '')
    : '?';
  const error = state === 'failed';  // the states of lsp_server/engine/client.py
  const icon = state === 'ready' ? '$(sparkle)' : error ? '$(error)' : state === 'backoff' ? '$(warning)'
    : state === 'stopped' ? '$(circle-slash)' : '$(loading~spin)';
  let text = state === 'ready' ? `offpilot ${model}` : `offpilot ${model}: ${state}`;
  const lines = [`state: ${state}${status?.detail ? ` (${status.detail})` : ''}`, `model: ${status?.model ?? '?'}`];
  if (status?.family) lines.push(`prompt family: ${status.family}`);
  const last = status?.lastCompletion;
  if (last && typeof last === 'object') {
    const parts: string[] = [];
    if (typeof last.totalMs === 'number') parts.push(`${Math.round(last.totalMs)} ms`);
    if (typeof last.cache === 'string') parts.push(`cache ${last.cache}`);  // miss, memory, disk, type-through
    if (parts.length) {
      text += ` · ${parts.join(' · ')}`;
      lines.push(`last completion: ${parts.join(', ')}`);
    }
  }
  const cache = status?.cache;
  if (cache && typeof cache === 'object') {
    const hits = ['memoryHits', 'diskHits', 'typeThrough', 'misses']
      .filter((k) => typeof cache[k] === 'number')
      .map((k) => `${k} ${cache[k]}`);
    lines.push(cache.enabled === false ? 'cache: off' : `cache: ${hits.join(', ') || 'on'}`);
  }
  return { text, icon, lines, error };
}
