// The VS Code client of offpilot: it starts `offpilot serve` over stdio and lets vscode-languageclient do
// the LSP work (inline completions are its standard inlineCompletion feature). Everything else here is
// thin UI: the explain panel, the refactor instruction box, the status bar item and the settings.
// Prompts, context, the cache and the model all belong to the server.
import * as vscode from 'vscode';
import {
  DidChangeConfigurationNotification,
  LanguageClient,
  LanguageClientOptions,
  ServerOptions,
  State,
} from 'vscode-languageclient/node';
import { describeStatus, resolveServerCommand, serverSettings } from './server';

const SECTION = 'offpilot';
const EXPLAIN = 'offpilot.explain';
const REFACTOR = 'offpilot.refactor';
const STATUS_POLL_MS = 5000;
const STATUS_POLL_LOADING_MS = 1000;

let client: LanguageClient | undefined;
let output: vscode.LogOutputChannel;
let status: StatusItem;
let explainPanel: vscode.WebviewPanel | undefined;
/** Commands registered for one server run (fallbacks for commands the server does not offer). */
let sessionDisposables: vscode.Disposable[] = [];
let contributedKeys: string[] = [];
/** The settings keys the running server was last sent (see currentServerSettings). */
let sentKeys = new Set<string>();

export async function activate(context: vscode.ExtensionContext): Promise<void> {
  output = vscode.window.createOutputChannel('offpilot', { log: true });
  status = new StatusItem();
  const configuration = context.extension.packageJSON?.contributes?.configuration;  // titled groups
  contributedKeys = (Array.isArray(configuration) ? configuration : [configuration])
    .flatMap((group: any) => Object.keys(group?.properties ?? {}))
    .filter((key) => key.startsWith(`${SECTION}.`))
    .map((key) => key.slice(SECTION.length + 1));
  context.subscriptions.push(
    output,
    status,
    vscode.commands.registerCommand('offpilot.restart', () => restart()),
    vscode.commands.registerCommand('offpilot.showStatus', () => showStatus()),
    vscode.workspace.onDidChangeConfiguration((event) => onConfigurationChanged(event)),
    { dispose: () => disposeSession() },
  );
  await start();
}

export async function deactivate(): Promise<void> {
  await stop();
}

/** The server's settings the user set (anywhere: user, workspace, folder), plus those set before and
 * since removed, with their defaults, so the server goes back to the default too. The server has the
 * same defaults (package.json is generated from its settings tree), so nothing else needs sending. */
function currentServerSettings(): Record<string, Record<string, unknown>> {
  const config = vscode.workspace.getConfiguration(SECTION);
  const isSet = (key: string) => {
    const where = config.inspect(key);
    return where !== undefined && [where.globalValue, where.workspaceValue, where.workspaceFolderValue].some((v) => v !== undefined);
  };
  const nowSet = new Set(contributedKeys.filter(isSet));
  const settings = serverSettings(contributedKeys, (key) => (nowSet.has(key) || sentKeys.has(key) ? config.get(key) : undefined));
  sentKeys = nowSet;
  // This extension shows explanations in its own panel: the server need not also open them as files.
  (settings.actions ??= {}).showDocument = false;
  return settings;
}

async function start(): Promise<void> {
  const config = vscode.workspace.getConfiguration(SECTION);
  const folders = (vscode.workspace.workspaceFolders ?? [])
    .filter((f) => f.uri.scheme === 'file')
    .map((f) => f.uri.fsPath);
  let command;
  try {
    command = resolveServerCommand(config.get('server.command'), config.get('server.root'), folders);
  } catch (error) {
    const message = error instanceof Error ? error.message : String(error);
    output.error(message);
    status.show({ state: 'no server', model: '' }, message);
    const choice = await vscode.window.showErrorMessage(`offpilot: ${message}`, 'Open Settings');
    if (choice === 'Open Settings') {
      void vscode.commands.executeCommand('workbench.action.openSettings', 'offpilot.server');
    }
    return;
  }
  output.info(`starting ${JSON.stringify([command.command, ...command.args])} (from ${command.source})`);
  sentKeys = new Set();  // a new server process knows only its defaults
  const initializationOptions = currentServerSettings();
  output.info(`initializationOptions ${JSON.stringify(initializationOptions)}`);
  const serverOptions: ServerOptions = {
    command: command.command,
    args: command.args,
    options: { cwd: folders[0] },
  };
  const clientOptions: LanguageClientOptions = {
    // Every file: the server handles languages without a grammar as plain text.
    documentSelector: [{ scheme: 'file' }, { scheme: 'untitled' }],
    initializationOptions: initializationOptions,
    outputChannel: output,
    middleware: {
      executeCommand: (name, args, next) => runServerCommand(name, args, next),
      provideInlineCompletionItems: async (document, position, context, token, next) => {
        try {
          return await next(document, position, context, token);
        } finally {
          status.refreshSoon();  // the server's lastCompletion (latency, cache) for the status bar
        }
      },
    },
  };
  const created = new LanguageClient('offpilot', 'offpilot', serverOptions, clientOptions);
  client = created;
  created.onDidChangeState((event) => {
    if (event.newState === State.Stopped) status.show({ state: 'stopped', model: '' });
  });
  status.show({ state: 'starting', model: '' });
  try {
    await created.start();
  } catch (error) {
    status.show({ state: 'failed', model: '' }, String(error));
    output.error(`the server did not start: ${error}`);
    return;
  }
  if (client !== created) return;  // stopped or restarted meanwhile
  registerFallbacks(created);
  status.poll(created);
}

/** The server advertises the commands it offers; vscode-languageclient registers a VS Code command of
 * that name for each (which is why this extension does not register offpilot.explain itself: a second
 * registration would fail). For one the server does not offer, say so instead of "command not found". */
function registerFallbacks(running: LanguageClient): void {
  const offered = running.initializeResult?.capabilities.executeCommandProvider?.commands ?? [];
  output.info(`server commands: ${offered.length ? offered.join(', ') : '(none)'}`);
  for (const name of [EXPLAIN, REFACTOR]) {
    if (offered.includes(name)) continue;
    sessionDisposables.push(vscode.commands.registerCommand(name, () => {
      void vscode.window.showWarningMessage(`offpilot: this server does not offer ${name}; update offpilot.`);
    }));
  }
}

function disposeSession(): void {
  sessionDisposables.forEach((d) => d.dispose());
  sessionDisposables = [];
}

async function stop(): Promise<void> {
  const running = client;
  client = undefined;
  status.stopPolling();
  disposeSession();
  if (running) {
    try {
      await running.stop(5000);
    } catch (error) {
      output.warn(`stopping the server: ${error}`);
    }
  }
}

async function restart(): Promise<void> {
  await stop();
  await start();
}

function onConfigurationChanged(event: vscode.ConfigurationChangeEvent): void {
  if (!event.affectsConfiguration(SECTION)) return;
  if (event.affectsConfiguration(`${SECTION}.server`)) {
    output.info('offpilot.server changed: restarting the server');
    void restart();
    return;
  }
  if (client?.state === State.Running) {
    // The server applies completion and cache settings at once; model and worker settings at its next start.
    const settings = { [SECTION]: currentServerSettings() };
    output.info(`workspace/didChangeConfiguration ${JSON.stringify(settings)}`);
    void client.sendNotification(DidChangeConfigurationNotification.type, { settings });
  }
  if (event.affectsConfiguration(`${SECTION}.model`) || event.affectsConfiguration(`${SECTION}.worker`)) {
    void vscode.window.showInformationMessage('offpilot: model settings take effect when the server restarts.', 'Restart Now')
      .then((choice) => { if (choice === 'Restart Now') void restart(); });
  }
}

// ---- explain / refactor ----------------------------------------------------------------------------------

interface SelectionArgument { uri: string; range: unknown; instruction?: string }

/** The active editor's selection as the commands' argument (an empty selection: the server takes the
 * enclosing function or class). */
function selectionArgument(running: LanguageClient): SelectionArgument | undefined {
  const editor = vscode.window.activeTextEditor;
  if (!editor) return undefined;
  return {
    uri: running.code2ProtocolConverter.asUri(editor.document.uri),
    range: running.code2ProtocolConverter.asRange(editor.selection),
  };
}

/** Every execution of a server command goes through here: from the command palette or a key (no
 * arguments: the selection is used), and from a code action (the server's own arguments). */
async function runServerCommand(name: string, args: any[], next: (command: string, args: any[]) => vscode.ProviderResult<any>): Promise<any> {
  if (name !== EXPLAIN && name !== REFACTOR) return next(name, args);
  const running = client;
  if (!running) return undefined;
  let argument: SelectionArgument | undefined = args.length > 0 ? { ...args[0] } : selectionArgument(running);
  if (!argument) {
    void vscode.window.showInformationMessage(`offpilot: open a file and select code first.`);
    return undefined;
  }
  if (name === REFACTOR && argument.instruction === undefined) {
    const instruction = await vscode.window.showInputBox({
      title: 'offpilot: refactor',
      prompt: 'What should change? (empty: simpler and clearer, same behaviour)',
      placeHolder: 'e.g. use a dict comprehension',
    });
    if (instruction === undefined) return undefined;  // Escape: nothing happens
    if (instruction.trim() !== '') argument = { ...argument, instruction: instruction.trim() };
  }
  const title = name === EXPLAIN ? 'offpilot: explaining…' : 'offpilot: refactoring…';
  let result: any;
  try {
    result = await vscode.window.withProgress(
      { location: vscode.ProgressLocation.Notification, title },
      async () => next(name, [argument, ...args.slice(1)]),
    );
  } catch (error) {
    output.error(`${name} failed: ${error}`);
    return undefined;  // vscode-languageclient has already shown the error
  }
  // Results: explain {title, markdown, error?}; refactor {applied, error}. When the server refuses (a
  // document that changed, a selection too large...) it says why itself (window/showMessage).
  if (result?.error) output.warn(`${name}: ${result.error}`);
  if (name === EXPLAIN) {
    if (typeof result?.markdown === 'string' && result.markdown.trim() !== '') {
      await showMarkdown(result.markdown);
    } else if (result != null && !result.error) {
      output.warn(`${EXPLAIN}: no explanation in ${JSON.stringify(result)}`);
    }
  }
  return result;
}

function escapeHtml(text: string): string {
  return text.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

/** The explanation in a webview beside the editor, rendered by VS Code's own Markdown extension. No
 * scripts, and a policy that loads nothing from outside (the text comes from a model). */
async function showMarkdown(markdown: string): Promise<void> {
  let body: string;
  try {
    body = await vscode.commands.executeCommand<string>('markdown.api.render', markdown);
  } catch {
    body = `<pre>${escapeHtml(markdown)}</pre>`;  // the built-in Markdown extension is disabled
  }
  if (!explainPanel) {
    explainPanel = vscode.window.createWebviewPanel(
      'offpilot.explanation', 'offpilot: Explanation',
      { viewColumn: vscode.ViewColumn.Beside, preserveFocus: true },
      { enableScripts: false, enableFindWidget: true },
    );
    explainPanel.onDidDispose(() => { explainPanel = undefined; });
  }
  const csp = `default-src 'none'; style-src ${explainPanel.webview.cspSource} 'unsafe-inline'; img-src ${explainPanel.webview.cspSource} data:;`;
  explainPanel.webview.html = `<!DOCTYPE html><html><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="${csp}">
<style>body { font-family: var(--vscode-font-family); font-size: var(--vscode-font-size); line-height: 1.5; padding: 0 1em; }
code, pre { font-family: var(--vscode-editor-font-family); } pre { background: var(--vscode-textCodeBlock-background); padding: .5em; overflow-x: auto; }</style>
</head><body class="offpilot-explanation">${body}</body></html>`;
  explainPanel.reveal(vscode.ViewColumn.Beside, true);
}

// ---- status ------------------------------------------------------------------------------------------------

async function showStatus(): Promise<void> {
  if (!client || client.state !== State.Running) {
    output.info('the server is not running');
  } else {
    try {
      const reply = await client.sendRequest('offpilot/status', {});
      output.info(`offpilot/status: ${JSON.stringify(reply, null, 2)}`);
    } catch (error) {
      output.error(`offpilot/status failed: ${error}`);
    }
  }
  output.show(true);
}

/** The status bar item: model, state, and the last completion's latency and cache result when the server
 * reports them (`lastCompletion` in offpilot/status). Polled, faster while the model loads, and asked
 * again right after each inline completion. */
class StatusItem implements vscode.Disposable {
  private readonly item = vscode.window.createStatusBarItem('offpilot.status', vscode.StatusBarAlignment.Right, 100);
  private timer: ReturnType<typeof setTimeout> | undefined;
  private soon: ReturnType<typeof setTimeout> | undefined;
  private polled: LanguageClient | undefined;
  private inFlight = false;

  constructor() {
    this.item.name = 'offpilot';
    this.item.command = 'offpilot.showStatus';
    this.item.show();
  }

  show(reply: any, problem?: string): void {
    const view = describeStatus(reply);
    this.item.text = `${view.icon} ${view.text}`;
    const tooltip = new vscode.MarkdownString(view.lines.map((l) => `- ${l}`).join('\n'));
    if (problem) tooltip.appendMarkdown(`\n\n${problem}`);
    tooltip.appendMarkdown('\n\nClick for the full status in the output channel.');
    this.item.tooltip = tooltip;
    this.item.backgroundColor = view.error || problem ? new vscode.ThemeColor('statusBarItem.errorBackground') : undefined;
  }

  poll(running: LanguageClient): void {
    this.stopPolling();
    this.polled = running;
    void this.refresh();
  }

  stopPolling(): void {
    this.polled = undefined;
    if (this.timer) clearTimeout(this.timer);
    if (this.soon) clearTimeout(this.soon);
    this.timer = this.soon = undefined;
  }

  refreshSoon(): void {
    if (!this.polled || this.soon) return;
    this.soon = setTimeout(() => { this.soon = undefined; void this.refresh(); }, 100);
  }

  private async refresh(): Promise<void> {
    const running = this.polled;
    if (!running || this.inFlight) return;
    if (this.timer) clearTimeout(this.timer);
    this.inFlight = true;
    let delay = STATUS_POLL_MS;
    try {
      if (running.state === State.Running) {
        const reply: any = await running.sendRequest('offpilot/status', {});
        if (this.polled === running) this.show(reply);
        if (reply?.state === 'loading' || reply?.state === 'backoff') delay = STATUS_POLL_LOADING_MS;
      }
    } catch (error) {
      if (this.polled === running) this.show({ state: 'error', model: '' }, `offpilot/status failed: ${error}`);
    } finally {
      this.inFlight = false;
    }
    if (this.polled === running) this.timer = setTimeout(() => void this.refresh(), delay);
  }

  dispose(): void {
    this.stopPolling();
    this.item.dispose();
  }
}
