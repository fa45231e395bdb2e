-- offpilot for Neovim: starts `offpilot serve` through vim.lsp and shows its inline completions.
-- See :help offpilot.
local api = vim.api
local compat = require('offpilot.compat')

local M = {}

M.client_name = 'offpilot'

local defaults = {
  --- The server command (a list, or one program path); nil: <repo>/.venv/bin/offpilot next to this
  --- plugin, else `offpilot` on $PATH, each with `serve`.
  cmd = nil,
  cmd_cwd = nil,
  cmd_env = nil,
  --- Filetypes whose buffers start (or join) the server.
  filetypes = {
    'python',
    'javascript',
    'javascriptreact',
    'typescript',
    'typescriptreact',
    'go',
    'rust',
    'c',
    'cpp',
    'java',
  },
  --- The workspace root is the nearest folder above the file with one of these (else the file's folder).
  root_markers = { '.git', 'pyproject.toml', 'setup.py', 'package.json', 'go.mod', 'Cargo.toml', 'pom.xml' },
  --- Server settings, sent as initializationOptions (see `offpilot` README's settings table), e.g.
  --- { completion = { maxLines = 6 }, model = { name = 'qwen2.5-coder-1.5b' } }; merged over these.
  init_options = {
    -- Explanations open in a float here; the server need not also open them as a file.
    actions = { showDocument = false },
  },
  --- Extra client capabilities, merged over Neovim's own.
  capabilities = {},
  --- Ask for a suggestion while typing (after `debounce_ms` without a keystroke or cursor move).
  auto_trigger = true,
  debounce_ms = 40,
  --- 'auto': Neovim's vim.lsp.inline_completion where it exists (0.12+), extmarks otherwise;
  --- true / false force one or the other.
  native = 'auto',
  --- Insert-mode keys, buffer-local in attached buffers; false leaves a key unmapped. The accept and
  --- dismiss keys do what they would do without offpilot when no suggestion is shown.
  keymaps = {
    accept = '<Tab>',
    accept_line = '<M-Down>',
    accept_word = '<M-Right>',
    dismiss = '<C-]>',
    trigger = '<M-\\>',
  },
  hl_group = 'OffpilotGhost',
}

M.config = vim.deepcopy(defaults)

--- Options that are lists: a list given to setup() replaces the default instead of merging with it.
local list_options = { cmd = true, filetypes = true, root_markers = true }

local function uses_native()
  if M.config.native == 'auto' then
    return require('offpilot.native').available()
  end
  return M.config.native == true and require('offpilot.native').available()
end

--- The module that shows suggestions: Neovim's own (0.12+) or our extmarks.
function M.backend()
  return uses_native() and require('offpilot.native') or require('offpilot.ghost')
end

--- The repository this plugin lies in (editor-clients/nvim/lua/offpilot/init.lua, five levels down).
local function plugin_repo()
  local source = debug.getinfo(1, 'S').source:gsub('^@', '')
  return vim.fn.fnamemodify(source, ':p:h:h:h:h:h')
end

--- The server command and where it came from ('setup', 'repository', 'PATH'), or nil and why not.
---@return string[]?, string
function M.server_command()
  local cmd = M.config.cmd
  if type(cmd) == 'string' then
    return { cmd }, 'setup'
  elseif type(cmd) == 'table' and #cmd > 0 then
    return vim.deepcopy(cmd), 'setup'
  end
  local bundled = plugin_repo() .. '/.venv/bin/offpilot'
  if vim.fn.executable(bundled) == 1 then
    return { bundled, 'serve' }, 'repository'
  end
  if vim.fn.executable('offpilot') == 1 then
    return { vim.fn.exepath('offpilot'), 'serve' }, 'PATH'
  end
  return nil, ('neither %s nor `offpilot` on $PATH is executable (run scripts/setup, or set cmd)'):format(bundled)
end

local function capabilities()
  local caps = vim.lsp.protocol.make_client_capabilities()
  caps.textDocument = caps.textDocument or {}
  -- Neovim < 0.12 does not say it; the server then answers textDocument/completion with the model too.
  caps.textDocument.inlineCompletion = caps.textDocument.inlineCompletion or { dynamicRegistration = false }
  -- vim.lsp.util.apply_workspace_edit() applies documentChanges (the server's versioned edits), though
  -- Neovim does not say so.
  caps.workspace = caps.workspace or {}
  caps.workspace.workspaceEdit = caps.workspace.workspaceEdit or {}
  if caps.workspace.workspaceEdit.documentChanges == nil then
    caps.workspace.workspaceEdit.documentChanges = true
  end
  return vim.tbl_deep_extend('force', caps, M.config.capabilities or {})
end

--- Markdown out of a command result: a string, MarkupContent, or { markdown = ... }.
---@return string?
function M.markdown_of(result)
  if type(result) == 'string' then
    return result
  end
  if type(result) == 'table' then
    if type(result.markdown) == 'string' then
      return result.markdown
    end
    if type(result.value) == 'string' and (result.kind == 'markdown' or result.kind == 'plaintext') then
      return result.value
    end
  end
end

--- Show Markdown text (an explanation, say) in a floating window at the cursor; returns buf, win.
---@param markdown string
---@param opts? table vim.lsp.util.open_floating_preview options
function M.show_markdown(markdown, opts)
  local lines = vim.split(markdown, '\n', { plain = true })
  opts = vim.tbl_extend('keep', opts or {}, {
    border = 'rounded',
    focus_id = 'offpilot-markdown',
    max_width = math.max(40, math.min(100, vim.o.columns - 4)),
    max_height = math.max(5, math.floor(vim.o.lines * 0.6)),
    wrap = true,
  })
  -- Called again with the same text, Neovim's preview enters the float (to scroll it); other text (the
  -- next explanation) replaces it.
  local buf = api.nvim_get_current_buf()
  for _, win in ipairs(api.nvim_list_wins()) do
    if vim.w[win][opts.focus_id] == buf and vim.w[win].offpilot_markdown ~= markdown then
      api.nvim_win_close(win, true)
    end
  end
  local fbuf, fwin = vim.lsp.util.open_floating_preview(lines, 'markdown', opts)
  if fwin and api.nvim_win_is_valid(fwin) then
    vim.w[fwin].offpilot_markdown = markdown
  end
  return fbuf, fwin
end

--- A command's Markdown result (an explanation: { title, markdown }) in a float; false when it has none.
function M.show_result(result)
  local markdown = M.markdown_of(result)
  if not markdown or markdown == '' then
    return false
  end
  local title = type(result) == 'table' and type(result.title) == 'string' and result.title ~= ''
    and (' ' .. result.title:gsub('^offpilot: ', '') .. ' ')
    or nil
  M.show_markdown(markdown, { title = title })
  return true
end

--- Errors of workspace/executeCommand, except a cancel the user asked for (:Offpilot cancel).
function M.report_error(err)
  if err and err.code ~= vim.lsp.protocol.ErrorCodes.RequestCancelled then
    vim.notify('offpilot: ' .. tostring(err.message or err), vim.log.levels.ERROR)
  end
end

--- workspace/executeCommand replies (code actions run through it): Markdown results (an explanation)
--- go to a float, errors to a message.
local function on_execute_command(err, result)
  if err then
    M.report_error(err)
    return
  end
  M.show_result(result)
end

--- Code actions at the cursor or for the selection: Neovim's own vim.lsp.buf.code_action(), which
--- lists the actions of every attached server, offpilot's among them.
function M.code_action(opts)
  return vim.lsp.buf.code_action(opts)
end

--- Explain the code at the cursor (the function or class around it), a line range or the visual
--- selection, in a floating window. See offpilot.actions.
function M.explain(opts)
  return require('offpilot.actions').explain(opts)
end

--- Refactor it, towards opts.instruction or a goal asked for with vim.ui.input (empty: the default).
function M.refactor(opts)
  return require('offpilot.actions').refactor(opts)
end

--- Work the model is doing for an action (explain, refactor, a resolved code action), per client id:
--- progress token -> what (the server reports it as cancellable work-done progress).
local running = {}

local function on_progress(client, token, value)
  if value.kind == 'begin' and value.cancellable then
    running[client.id] = running[client.id] or {}
    running[client.id][token] = (value.message or value.title or 'working'):gsub('^offpilot: ', '')
    local what = running[client.id][token]
    vim.notify(('offpilot: %s… (:Offpilot cancel stops it)'):format(what), vim.log.levels.INFO)
  elseif value.kind == 'end' and running[client.id] then
    running[client.id][token] = nil
  end
end

--- What the model is working on for actions now: a list of { client_id, token, what }.
function M.running()
  local out = {}
  for client_id, tokens in pairs(running) do
    if vim.lsp.get_client_by_id(client_id) then
      for token, what in pairs(tokens) do
        out[#out + 1] = { client_id = client_id, token = token, what = what }
      end
    else
      running[client_id] = nil -- the server stopped
    end
  end
  return out
end

--- Stop every action the model is working on (window/workDoneProgress/cancel); returns how many.
function M.cancel()
  local count = 0
  for _, item in ipairs(M.running()) do
    local client = vim.lsp.get_client_by_id(item.client_id)
    if client and not compat.is_stopped(client) then
      compat.notify(client, 'window/workDoneProgress/cancel', { token = item.token })
      count = count + 1
    end
  end
  return count
end

--- Start the server for `buf` (or attach the buffer to the one already running).
---@return integer? client_id
function M.start(buf)
  buf = (buf == nil or buf == 0) and api.nvim_get_current_buf() or buf
  if vim.bo[buf].buftype ~= '' then
    return nil
  end
  local cmd, why = M.server_command()
  if not cmd then
    vim.notify_once('offpilot: ' .. why, vim.log.levels.ERROR)
    return nil
  end
  local name = api.nvim_buf_get_name(buf)
  local root = vim.fs.root(buf, M.config.root_markers)
    or (name ~= '' and vim.fs.dirname(name))
    or vim.fn.getcwd()
  local init_options = M.config.init_options
  if type(init_options) ~= 'table' or next(init_options) == nil then
    init_options = nil
  end
  return vim.lsp.start({
    name = M.client_name,
    cmd = cmd,
    cmd_cwd = M.config.cmd_cwd,
    cmd_env = M.config.cmd_env,
    root_dir = root,
    init_options = init_options,
    capabilities = capabilities(),
    handlers = { ['workspace/executeCommand'] = on_execute_command },
  }, {
    bufnr = buf,
    -- One server (one loaded model) for the whole editor, whatever the project.
    reuse_client = function(client, config)
      return client.name == config.name and not compat.is_stopped(client)
    end,
  })
end

local function map_keys(buf, backend)
  local keys = M.config.keymaps or {}
  local function expr_map(lhs, desc, act)
    if not lhs then
      return
    end
    vim.keymap.set('i', lhs, function()
      if not backend.visible(buf) then
        return lhs -- what the key does without offpilot
      end
      -- The edit cannot happen under an <expr> mapping's textlock: do it right after.
      vim.schedule(act)
      return ''
    end, { buffer = buf, expr = true, replace_keycodes = true, desc = desc })
  end
  expr_map(keys.accept, 'offpilot: accept the suggestion', function()
    backend.accept('all')
  end)
  expr_map(keys.accept_line, 'offpilot: accept the next line of the suggestion', function()
    backend.accept('line')
  end)
  expr_map(keys.accept_word, 'offpilot: accept the next word of the suggestion', function()
    backend.accept('word')
  end)
  expr_map(keys.dismiss, 'offpilot: dismiss the suggestion', function()
    backend.dismiss(buf)
  end)
  if keys.trigger then
    vim.keymap.set('i', keys.trigger, function()
      backend.trigger(buf)
    end, { buffer = buf, desc = 'offpilot: ask for a suggestion now' })
  end
end

local function on_attach(buf, client)
  local backend = M.backend()
  if backend == require('offpilot.ghost') then
    backend.configure({
      client_name = M.client_name,
      auto_trigger = M.config.auto_trigger,
      debounce_ms = M.config.debounce_ms,
      hl_group = M.config.hl_group,
    })
    backend.attach(buf)
  else
    backend.attach(buf, client)
  end
  map_keys(buf, backend)
end

--- Public actions on the current buffer, for mappings of your own (all return true when they did it).
function M.accept()
  return M.backend().accept('all')
end
function M.accept_line()
  return M.backend().accept('line')
end
function M.accept_word()
  return M.backend().accept('word')
end
function M.dismiss()
  return M.backend().dismiss(0)
end
function M.trigger()
  return M.backend().trigger(0)
end
function M.visible()
  return M.backend().visible(0)
end

--- The server's offpilot/status for a client (default: the one attached to the current buffer).
---@return table? status, string? error
function M.status(client, timeout_ms)
  client = client or vim.lsp.get_clients({ name = M.client_name })[1]
  if not client then
    return nil, 'no offpilot server is running'
  end
  local reply, err = compat.request_sync(client, 'offpilot/status', vim.empty_dict(), timeout_ms or 2000, 0)
  if not reply then
    return nil, err or 'no reply'
  end
  if reply.err then
    return nil, tostring(reply.err.message or reply.err)
  end
  return reply.result, nil
end

function M.setup(opts)
  M.config = vim.tbl_deep_extend('force', vim.deepcopy(defaults), opts or {})
  for key in pairs(list_options) do
    if type((opts or {})[key]) == 'table' then
      M.config[key] = vim.deepcopy(opts[key]) -- a list replaces the default whole
    end
  end
  api.nvim_set_hl(0, 'OffpilotGhost', { link = 'Comment', default = true })
  local group = api.nvim_create_augroup('offpilot', { clear = true })
  api.nvim_create_autocmd('FileType', {
    group = group,
    pattern = M.config.filetypes,
    callback = function(args)
      M.start(args.buf)
    end,
  })
  api.nvim_create_autocmd('LspAttach', {
    group = group,
    callback = function(args)
      local client = vim.lsp.get_client_by_id(args.data.client_id)
      if client and client.name == M.client_name then
        on_attach(args.buf, client)
      end
    end,
  })
  api.nvim_create_autocmd('LspDetach', {
    group = group,
    callback = function(args)
      local client = vim.lsp.get_client_by_id(args.data.client_id)
      if client and client.name == M.client_name then
        M.backend().detach(args.buf)
      end
    end,
  })
  api.nvim_create_autocmd('LspProgress', {
    group = group,
    callback = function(args)
      local data = args.data or {}
      local client = data.client_id and vim.lsp.get_client_by_id(data.client_id)
      local value = data.params and data.params.value
      if not (client and client.name == M.client_name and type(value) == 'table') then
        return
      end
      local token = data.params.token
      if value.cancellable or (running[client.id] and running[client.id][token]) then
        on_progress(client, token, value) -- an action
      elseif value.kind == 'end' then
        -- The model is loaded: suggestions asked for while it loaded were empty.
        if not uses_native() then
          require('offpilot.ghost').retry_all()
        end
      end
    end,
  })
  local wanted = {}
  for _, ft in ipairs(M.config.filetypes) do
    wanted[ft] = true
  end
  for _, buf in ipairs(api.nvim_list_bufs()) do
    if api.nvim_buf_is_loaded(buf) and wanted[vim.bo[buf].filetype] then
      M.start(buf)
    end
  end
end

return M
