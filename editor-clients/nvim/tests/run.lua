-- Drives the scenarios of tests/test_nvim_client.py in one real headless Neovim, against one server
-- started by the plugin, and writes what each saw (buffer lines, ghost text, counters) as JSON for the
-- Python side to assert on.
--
-- Keys go in through nvim_feedkeys, so Neovim's own main loop runs insert mode, the mappings and the
-- autocommands exactly as for a user. The scenarios run in a coroutine that yields back to that loop
-- between steps and polls for conditions (every 10 ms, each with a timeout) instead of sleeping. A
-- scenario that fails records its error and the state at that moment; the next one still runs.
--
-- Environment: OFFPILOT_TEST_DIR (holds demo_<scenario>.py for each scenario), OFFPILOT_TEST_SCENARIOS
-- (comma-separated, in order), OFFPILOT_TEST_CMD (the server command, JSON list), OFFPILOT_TEST_RESULT
-- (where the JSON goes).
local api = vim.api

local script = debug.getinfo(1, 'S').source:gsub('^@', '')
local plugin_dir = vim.fn.fnamemodify(script, ':p:h:h')
vim.opt.runtimepath:prepend(plugin_dir)
vim.cmd('runtime plugin/offpilot.lua')
vim.cmd('filetype on')

local t0 = vim.uv.hrtime()
local result = { scenarios = {}, times_ms = {}, nvim_version = tostring(vim.version()) }
local current -- the running scenario's part of `result`
local finished = false
local co

local function mark(what)
  result.times_ms[#result.times_ms + 1] = { what, math.floor((vim.uv.hrtime() - t0) / 1e6) }
end

local function finish(err)
  if finished then
    return
  end
  finished = true
  result.error = err
  mark('finish')
  result.clients = #vim.lsp.get_clients({ name = 'offpilot' })
  result.messages = api.nvim_exec2('messages', { output = true }).output
  vim.fn.writefile({ vim.json.encode(result) }, os.getenv('OFFPILOT_TEST_RESULT'))
  for _, client in ipairs(vim.lsp.get_clients()) do
    client:stop()
  end
  vim.wait(2000, function()
    return #vim.lsp.get_clients() == 0
  end, 20)
  vim.cmd('qall!')
end

local function step()
  local ok, err = coroutine.resume(co)
  if not ok then
    finish(debug.traceback(co, err))
  elseif coroutine.status(co) == 'dead' then
    finish(nil)
  end
end

local function sleep(ms)
  vim.defer_fn(step, ms)
  coroutine.yield()
end

local function wait_for(what, cond, timeout_ms)
  timeout_ms = timeout_ms or 8000
  local deadline = vim.uv.now() + timeout_ms
  while true do
    local value = cond()
    if value then
      return value
    end
    if vim.uv.now() >= deadline then
      error(('timed out after %d ms waiting for %s'):format(timeout_ms, what), 2)
    end
    sleep(10)
  end
end

local function feed(keys)
  api.nvim_feedkeys(api.nvim_replace_termcodes(keys, true, false, true), 'm', false)
end

local ghost_ns = api.nvim_create_namespace('offpilot.ghost')

--- The ghost text on screen, read from the extmarks themselves: row, col, text, how many marks.
local function ghost(buf)
  local marks = api.nvim_buf_get_extmarks(buf or 0, ghost_ns, 0, -1, { details = true })
  if #marks == 0 then
    return nil
  end
  local details = marks[1][4]
  local first = {}
  for _, chunk in ipairs(details.virt_text or {}) do
    first[#first + 1] = chunk[1]
  end
  local lines = { table.concat(first) }
  for _, virt_line in ipairs(details.virt_lines or {}) do
    local parts = {}
    for _, chunk in ipairs(virt_line) do
      parts[#parts + 1] = chunk[1]
    end
    lines[#lines + 1] = table.concat(parts)
  end
  return {
    row = marks[1][2],
    col = marks[1][3],
    text = table.concat(lines, '\n'),
    marks = #marks,
    pos = details.virt_text_pos,
  }
end

local function ghost_is(row, col, text)
  return function()
    local g = ghost()
    return g and g.row == row and g.col == col and g.text == text and g
  end
end

local function cursor()
  local pos = api.nvim_win_get_cursor(0)
  return { pos[1] - 1, pos[2] }
end

local function lines()
  return api.nvim_buf_get_lines(0, 0, -1, false)
end

local function line_is(row, text)
  return function()
    return api.nvim_buf_get_lines(0, row, row + 1, false)[1] == text
  end
end

local function record(name)
  local entry = {
    name = name,
    lines = lines(),
    cursor = cursor(),
    mode = api.nvim_get_mode().mode,
    ghost = ghost() or vim.NIL,
    stats = require('offpilot.ghost').stats(0) or vim.NIL,
  }
  current.steps[#current.steps + 1] = entry
  return entry
end

local function in_insert()
  return api.nvim_get_mode().mode == 'i'
end

local function to_normal_mode()
  feed('<Esc>')
  wait_for('normal mode', function()
    return api.nvim_get_mode().mode == 'n'
  end, 2000)
end

local function setup_once()
  if package.loaded['offpilot'] and require('offpilot').config.cmd then
    return
  end
  require('offpilot').setup({
    cmd = vim.json.decode(os.getenv('OFFPILOT_TEST_CMD')),
    -- The scripted model writes slowly (60 ms a piece): ask for whole blocks, the tests accept them line by line.
    init_options = { completion = { prefetch = false, firstLineFirst = false } },
  })
end

--- Open the scenario's file (which starts the server through the plugin, or joins the running one),
--- wait until the buffer is attached and the model is loaded.
local function open(name)
  setup_once()
  vim.cmd.edit(vim.fn.fnameescape(os.getenv('OFFPILOT_TEST_DIR') .. '/demo_' .. name .. '.py'))
  local buf = api.nvim_get_current_buf()
  current.filetype = vim.bo[buf].filetype
  wait_for('the offpilot client to attach', function()
    return #vim.lsp.get_clients({ bufnr = buf, name = 'offpilot' }) > 0 and require('offpilot.ghost').attached(buf)
  end, 15000)
  mark(name .. ': attached')
  wait_for('the model to be ready', function()
    local status = require('offpilot').status(nil, 1000)
    return status and status.state == 'ready'
  end, 15000)
  mark(name .. ': ready')
  current.offset_encoding = vim.lsp.get_clients({ bufnr = buf, name = 'offpilot' })[1].offset_encoding
  return buf
end

local scenarios = {}

-- The accept-word / accept-line split and position conversion, without a server.
function scenarios.text_pieces()
  local text = require('offpilot.text')
  current.pieces = {}
  for _, s in ipairs({ 'a + b', ' = x + 1\n    return y', '\n    return y', 'foo_bar(1)', '  \n', 'é_x = 1', '\n' }) do
    current.pieces[#current.pieces + 1] = { s, text.next_word(s), text.next_line(s) }
  end
  current.byte_cols = {
    text.byte_col('s = "😀" + x', 7, 'utf-16'), -- after the emoji: 2 UTF-16 units, 4 bytes
    text.byte_col('s = "😀" + x', 6, 'utf-32'),
    text.byte_col('s = "😀" + x', 9, 'utf-8'),
  }
  current.end_of = { { text.end_of(1, 4, 'ab') }, { text.end_of(1, 4, 'ab\n  cd') } }
end

-- setup()'s merge of the user's options with the defaults (before the server is started by setup_once).
function scenarios.setup_options()
  local offpilot = require('offpilot')
  current.init_options = {}
  for _, opts in ipairs({
    {},
    { init_options = {} },
    { init_options = { actions = { showDocument = true }, completion = { maxLines = 3 } } },
  }) do
    offpilot.setup(vim.tbl_extend('force', opts, { filetypes = { 'none' } }))
    current.init_options[#current.init_options + 1] = offpilot.config.init_options
  end
  current.filetypes = offpilot.config.filetypes
  offpilot.config.cmd = nil -- setup_once sets the test's options up
end

-- Markdown (an explanation, later) in a float, and what counts as Markdown in a command result.
function scenarios.markdown_float()
  local offpilot = require('offpilot')
  local before = api.nvim_get_current_win()
  local fbuf, fwin = offpilot.show_markdown('# Why\n\nIt adds `a` and `b`.')
  current.float = {
    relative = api.nvim_win_get_config(fwin).relative,
    lines = api.nvim_buf_get_lines(fbuf, 0, -1, false),
    filetype = vim.bo[fbuf].filetype,
    cursor_stays = api.nvim_get_current_win() == before,
  }
  current.markdown_of = {
    offpilot.markdown_of('x'),
    offpilot.markdown_of({ kind = 'markdown', value = 'y' }),
    offpilot.markdown_of({ markdown = 'z' }),
    offpilot.markdown_of({ 1, 2 }) or vim.NIL,
  }
  api.nvim_win_close(fwin, true)
end

-- Manual trigger (auto-trigger off for this buffer), accept all with <Tab>, write the file.
function scenarios.accept_all(name)
  local buf = open(name)
  vim.b[buf].offpilot_auto_trigger = false
  api.nvim_win_set_cursor(0, { 2, 0 })
  feed('A')
  wait_for('insert mode at the end of line 2', function()
    return in_insert() and cursor()[1] == 1 and cursor()[2] == 11
  end)
  sleep(100) -- would an automatic request go out (the debounce is 40 ms)?
  record('insert mode, nothing asked yet')
  -- Ask, then move the cursor before the answer comes (auto-trigger is off: nothing newer is asked
  -- for, and the server cannot know the cursor moved). The late answer is for a place the cursor left
  -- and must never show.
  feed('<M-\\>')
  wait_for('the request', function()
    return require('offpilot.ghost').stats(buf).requests == 1
  end, 2000)
  feed('<Left>')
  wait_for('the cursor one column left', function()
    return cursor()[2] == 10
  end, 2000)
  sleep(700) -- longer than the scripted answer takes (~0.4 s)
  record('moved while the answer was on its way')
  feed('<End>')
  wait_for('the cursor back at the end', function()
    return cursor()[2] == 11
  end, 2000)
  feed('<M-\\>')
  wait_for('ghost text "a + b" at the cursor', ghost_is(1, 11, 'a + b'))
  record('ghost shown')
  feed('<Tab>')
  wait_for('the suggestion in the buffer', line_is(1, '    return a + b'))
  record('accepted')
  to_normal_mode()
  vim.cmd('write')
  record('written')
end

-- A two-line suggestion taken a word, then a line, then the next line.
function scenarios.accept_partial(name)
  open(name)
  api.nvim_win_set_cursor(0, { 2, 0 })
  feed('A')
  wait_for('ghost text with two lines', ghost_is(1, 4, 'a + b\n    return a + b'))
  record('ghost shown')
  feed('<M-Right>')
  wait_for('one word accepted', line_is(1, '    a'))
  wait_for('the rest still shown', ghost_is(1, 5, ' + b\n    return a + b'), 2000)
  record('after accept word')
  feed('<M-Down>')
  wait_for('the first line accepted', line_is(1, '    a + b'))
  wait_for('the second line still shown', ghost_is(1, 9, '\n    return a + b'), 2000)
  record('after accept line')
  feed('<M-Down>')
  wait_for('the second line accepted', line_is(2, '    return a + b'))
  record('after second accept line')
  to_normal_mode()
  vim.cmd('write')
  record('written')
end

-- Typing while a suggestion shows or is being computed: the old one goes at once, requests in
-- flight are cancelled, the answer for the newest state is the one shown.
function scenarios.typing(name)
  local buf = open(name)
  local offpilot_ghost = require('offpilot.ghost')
  -- At every text change (after the plugin's own handler) nothing may still be shown, and at every
  -- moment a shown suggestion must stand at the cursor.
  current.shown_at_change = {}
  current.misplaced = {}
  local changes = 0
  api.nvim_create_autocmd('TextChangedI', {
    buffer = buf,
    callback = function()
      changes = changes + 1
      local g = ghost(buf)
      if g then
        current.shown_at_change[#current.shown_at_change + 1] = g
      end
    end,
  })
  local watch = vim.uv.new_timer()
  local checks = 0
  watch:start(5, 5, vim.schedule_wrap(function()
    if api.nvim_get_current_buf() ~= buf then
      return
    end
    checks = checks + 1
    local g = ghost(buf)
    if g then
      local c = cursor()
      if g.row ~= c[1] or g.col ~= c[2] or g.marks ~= 1 then
        current.misplaced[#current.misplaced + 1] = { ghost = g, cursor = c }
      end
    end
  end))
  local ok, err = pcall(function()
    api.nvim_win_set_cursor(0, { 2, 0 })
    feed('A')
    wait_for('the first suggestion', ghost_is(1, 11, 'a + b'))
    record('first suggestion')
    local before = offpilot_ghost.stats(buf)
    for i, ch in ipairs({ 'x', 'y', 'z' }) do
      feed(ch)
      wait_for('the typed character', line_is(1, '    return ' .. ('xyz'):sub(1, i)), 2000)
      -- A typing rhythm slower than the client's debounce, faster than the scripted model's answer:
      -- each keystroke sends a request while the one before is still being answered.
      wait_for('the request for this keystroke', function()
        return offpilot_ghost.stats(buf).requests > before.requests
      end, 2000)
      before = offpilot_ghost.stats(buf)
    end
    record('typed')
    wait_for('the suggestion for the final text', ghost_is(1, 14, 'a + b'))
    record('final suggestion')
    feed('<C-]>')
    wait_for('the suggestion dismissed', function()
      return ghost(buf) == nil
    end, 2000)
    record('dismissed')
    -- With nothing shown, the accept key does what it does without offpilot.
    vim.bo[buf].expandtab = false
    feed('<Tab>')
    wait_for('a tab typed', line_is(1, '    return xyz\t'), 2000)
    record('tab without a suggestion')
    to_normal_mode()
    record('left insert mode')
  end)
  watch:stop()
  watch:close()
  current.text_changes, current.watch_checks = changes, checks
  if not ok then
    error(err, 0)
  end
end

function scenarios.health(name)
  open(name)
  vim.cmd('checkhealth offpilot')
  wait_for('the health report', function()
    return vim.bo.filetype == 'checkhealth' and #lines() > 3
  end)
  current.health = lines()
end

-- ---- code actions and :Offpilot explain / refactor ----------------------------------------------------

local function offpilot_client(buf)
  return vim.lsp.get_clients({ bufnr = buf, name = 'offpilot' })[1]
end

--- The float show_markdown() opened for `buf`, as { lines, title, filetype, win }.
local function markdown_float(buf)
  for _, win in ipairs(api.nvim_list_wins()) do
    local config = api.nvim_win_get_config(win)
    if config.relative ~= '' and vim.w[win]['offpilot-markdown'] == buf then
      local fbuf = api.nvim_win_get_buf(win)
      local title = {}
      for _, chunk in ipairs(type(config.title) == 'table' and config.title or {}) do
        title[#title + 1] = chunk[1]
      end
      return {
        win = win,
        lines = api.nvim_buf_get_lines(fbuf, 0, -1, false),
        title = table.concat(title),
        filetype = vim.bo[fbuf].filetype,
      }
    end
  end
end

local function generations()
  return require('offpilot').status(nil, 1000).generationsStarted
end

-- Neovim's own code-action UI: a refactor, listed without its edit, resolved (codeAction/resolve) and
-- applied; one undo step takes it back.
function scenarios.action_refactor(name)
  local buf = open(name)
  local client = offpilot_client(buf)
  api.nvim_win_set_cursor(0, { 5, 8 }) -- in `area`
  local params = vim.lsp.util.make_range_params(0, client.offset_encoding)
  params.context = { diagnostics = {} }
  local listed = require('offpilot.compat').request_sync(client, 'textDocument/codeAction', params, 3000, buf)
  current.listed = {}
  for _, action in ipairs(listed.result or {}) do
    current.listed[#current.listed + 1] = {
      title = action.title,
      kind = action.kind,
      edit = action.edit ~= nil,
      command = type(action.command) == 'table' and action.command.command or vim.NIL,
    }
  end
  local before = lines()
  vim.lsp.buf.code_action({
    filter = function(action)
      return action.kind == 'refactor.rewrite'
    end,
    apply = true,
  })
  wait_for('the refactored function', function()
    return not vim.deep_equal(lines(), before)
  end)
  record('applied')
  vim.cmd('undo')
  record('undone')
  vim.cmd('redo')
  vim.cmd('write')
  record('written')
end

-- :Offpilot explain at the cursor, then from a visual-mode mapping over a selection that ends on a
-- two-byte character.
function scenarios.action_explain(name)
  local buf = open(name)
  local client = offpilot_client(buf)
  current.init_options = client.config.init_options -- the plugin's defaults merged with the test's
  local win = api.nvim_get_current_win()
  api.nvim_win_set_cursor(0, { 2, 8 }) -- in `area`
  vim.cmd('Offpilot explain')
  current.cursor_float = wait_for('the explanation float', function()
    return markdown_float(buf)
  end)
  current.cursor_float.cursor_stays = api.nvim_get_current_win() == win
  current.cursor_float.win = nil
  api.nvim_win_close(markdown_float(buf).win, true)

  -- The ranges sent for a selection from `return` (line 2) to the é of "héllo" (line 6), per encoding:
  -- the é is 2 bytes, 1 UTF-16 unit, 1 code point.
  local function range_of(encoding, opts)
    local range = require('offpilot.actions').target({ offset_encoding = encoding }, buf, opts).range
    return { range.start.line, range.start.character, range['end'].line, range['end'].character }
  end
  local from, to = { 2, 4 }, { 6, 13 }
  current.ranges = {}
  for _, encoding in ipairs({ 'utf-8', 'utf-16', 'utf-32' }) do
    current.ranges[encoding] = range_of(encoding, { range = { start = from, ['end'] = to } })
  end
  current.lines_range = range_of('utf-16', { line1 = 5, line2 = 6 })

  vim.keymap.set('x', '<F5>', function()
    require('offpilot').explain()
  end, { buffer = buf })
  api.nvim_win_set_cursor(0, from)
  feed('v')
  wait_for('visual mode', function()
    return api.nvim_get_mode().mode == 'v'
  end, 2000)
  api.nvim_win_set_cursor(0, to)
  feed('<F5>')
  current.visual_float = wait_for('the explanation of the selection', function()
    local float = markdown_float(buf)
    return float and float.title ~= current.cursor_float.title and float
  end)
  current.visual_float.win = nil
  current.mode_after = api.nvim_get_mode().mode
  -- No window/showDocument (the plugin sends actions.showDocument = false): no Markdown file opened.
  current.buffers = {}
  for _, b in ipairs(api.nvim_list_bufs()) do
    current.buffers[#current.buffers + 1] = vim.fn.fnamemodify(api.nvim_buf_get_name(b), ':t')
  end
  local float = markdown_float(buf)
  api.nvim_win_close(float.win, true)
end

-- :[range]Offpilot refactor with the goal typed into vim.ui.input (stubbed); a cancelled prompt sends
-- nothing.
function scenarios.action_command(name)
  local buf = open(name)
  local input = vim.ui.input
  local answers = { 'use full parameter names', nil }
  local asked = {}
  vim.ui.input = function(opts, on_confirm)
    asked[#asked + 1] = opts.prompt
    on_confirm(answers[#asked])
  end
  local ok, err = pcall(function()
    local before = lines()
    vim.cmd('4,5Offpilot refactor')
    wait_for('the refactored lines', function()
      return not vim.deep_equal(lines(), before)
    end)
    record('refactored')
    local started = generations()
    api.nvim_win_set_cursor(0, { 9, 4 }) -- in `circle`
    vim.cmd('Offpilot refactor')
    sleep(300)
    current.generations_after_cancel = generations() - started
    record('prompt cancelled')
    vim.cmd('write')
  end)
  vim.ui.input = input
  current.asked = asked
  if not ok then
    error(err, 0)
  end
end

-- :Offpilot cancel stops an explanation the model is still writing.
function scenarios.action_cancel(name)
  local buf = open(name)
  api.nvim_win_set_cursor(0, { 5, 8 })
  local client = offpilot_client(buf)
  local replied = false
  local sent, id = require('offpilot').explain({
    on_result = function()
      replied = true
    end,
  })
  current.sent = sent
  wait_for('the action under way', function()
    return #require('offpilot').running() > 0
  end)
  current.running = require('offpilot').running()[1].what
  current.pending_before = client.requests[id] ~= nil
  vim.cmd('Offpilot cancel')
  local t = vim.uv.now()
  -- The server answers RequestCancelled, which Neovim's RPC layer takes as the end of the request
  -- without calling its handler.
  wait_for('the request to end', function()
    return client.requests[id] == nil
  end, 5000)
  current.cancel_ms = vim.uv.now() - t
  current.replied = replied
  wait_for('the progress ended', function()
    return #require('offpilot').running() == 0
  end, 2000)
  current.float = markdown_float(buf) and true or false
  current.messages = api.nvim_exec2('messages', { output = true }).output
end

local function run_all()
  for name in vim.gsplit(os.getenv('OFFPILOT_TEST_SCENARIOS') or '', ',', { trimempty = true }) do
    current = { steps = {} }
    result.scenarios[name] = current
    local scenario = scenarios[name]
    local ok, err = pcall(function()
      assert(scenario, 'unknown scenario ' .. name)(name)
    end)
    current.ok = ok
    if not ok then
      current.error = tostring(err)
      pcall(record, 'at the failure')
      pcall(to_normal_mode)
    end
    mark(name .. ': done')
  end
end

-- Whatever happens, write a result and quit well before the Python side's timeout.
vim.defer_fn(function()
  finish('the scenarios did not finish within 50 s')
end, 50000)
co = coroutine.create(run_all)
vim.schedule(step)
