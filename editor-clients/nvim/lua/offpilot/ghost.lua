-- Ghost text for Neovim 0.10/0.11: textDocument/inlineCompletion rendered as extmarks.
--
-- One suggestion per buffer, always for the buffer state it was asked for: a reply is shown only when
-- b:changedtick and the cursor are still what they were when the request went out, and only the
-- newest request counts (an older one in flight is cancelled with $/cancelRequest when a newer one is
-- sent or when the text changes). All prompt, context and cache work is the server's.
local api = vim.api
local compat = require('offpilot.compat')
local text = require('offpilot.text')

local M = {}

M.ns = api.nvim_create_namespace('offpilot.ghost')

local INVOKED, AUTOMATIC = 1, 2

local config = {
  client_name = 'offpilot',
  auto_trigger = true,
  debounce_ms = 40,
  hl_group = 'OffpilotGhost',
}

---@class offpilot.Ghost
---@field row integer 0-based row of the cursor it belongs to
---@field col integer byte column of that cursor
---@field tick integer b:changedtick it was shown for
---@field text string what is left to insert at the cursor
---@field replace_end integer byte column on `row` up to which the last accept replaces text
---@field client_id integer
---@field command? table lsp.Command to run after the whole suggestion is accepted
---@field snippet? boolean insertText was a snippet (StringValue)

---@class offpilot.BufState
---@field seq integer bumped by every request and every invalidation: replies to older ones are dropped
---@field pending? {client_id: integer, id: integer, seq: integer, tick: integer, row: integer, col: integer}
---@field key? string "tick:row:col" of the last request sent, so one buffer state is asked about once
---@field ghost? offpilot.Ghost
---@field timer? uv.uv_timer_t
---@field stats table<string, integer>

---@type table<integer, offpilot.BufState>
local buffers = {}

function M.configure(opts)
  config = vim.tbl_extend('force', config, opts or {})
end

local function in_insert_mode()
  return api.nvim_get_mode().mode:sub(1, 1) == 'i'
end

--- The cursor of the current window, when it shows `buf`: 0-based row, byte column.
---@return integer?, integer?
local function cursor(buf)
  local win = api.nvim_get_current_win()
  if api.nvim_win_get_buf(win) ~= buf then
    return nil, nil
  end
  local pos = api.nvim_win_get_cursor(win)
  return pos[1] - 1, pos[2]
end

local function client_for(buf)
  return vim.lsp.get_clients({ bufnr = buf, name = config.client_name })[1]
end

--- Whether `g` still describes the buffer as it is, with the cursor where it was.
local function current(buf, g)
  if not g or not api.nvim_buf_is_valid(buf) then
    return false
  end
  local row, col = cursor(buf)
  return row == g.row and col == g.col and api.nvim_buf_get_changedtick(buf) == g.tick
end

local function clear_marks(buf)
  if api.nvim_buf_is_valid(buf) then
    api.nvim_buf_clear_namespace(buf, M.ns, 0, -1)
  end
end

--- Forget the shown suggestion and any request in flight (its reply will be dropped).
local function invalidate(buf, st)
  st.seq = st.seq + 1
  local pending = st.pending
  st.pending = nil
  if pending then
    local client = vim.lsp.get_client_by_id(pending.client_id)
    if client and not compat.is_stopped(client) then
      compat.cancel_request(client, pending.id)
      st.stats.cancelled = st.stats.cancelled + 1
    end
  end
  if st.ghost then
    st.ghost = nil
    clear_marks(buf)
  end
end

local function stop_timer(st)
  if st.timer then
    st.timer:stop()
  end
end

local function show(buf, st, g)
  clear_marks(buf)
  local display = g.text:gsub('\t', string.rep(' ', vim.bo[buf].tabstop))
  local lines = vim.split(display, '\n', { plain = true })
  local opts = { hl_mode = 'combine', priority = 200 }
  if lines[1] ~= '' then
    opts.virt_text = { { lines[1], config.hl_group } }
    opts.virt_text_pos = 'inline'
  end
  if #lines > 1 then
    opts.virt_lines = {}
    for i = 2, #lines do
      opts.virt_lines[#opts.virt_lines + 1] = { { lines[i], config.hl_group } }
    end
  end
  api.nvim_buf_set_extmark(buf, M.ns, g.row, g.col, opts)
  st.ghost = g
  st.stats.shown = st.stats.shown + 1
end

--- The suggestion an inline completion item makes at the cursor (row, col), or nil when it does not
--- apply there (a range on another line, or text before the cursor that the item does not start with).
---@return offpilot.Ghost?
local function ghost_from_item(buf, client, item, row, col)
  local insert, snippet = item.insertText, false
  if type(insert) == 'table' then -- lsp.StringValue: a snippet
    insert, snippet = insert.value, true
  end
  if type(insert) ~= 'string' then
    return nil
  end
  insert = insert:gsub('\r\n', '\n'):gsub('\r', '\n')
  local replace_end = col
  if item.range then
    local first, last = item.range.start, item.range['end']
    if first.line ~= row or last.line ~= row then
      return nil
    end
    local line = api.nvim_buf_get_lines(buf, row, row + 1, false)[1] or ''
    local from = text.byte_col(line, first.character, client.offset_encoding)
    local to = text.byte_col(line, last.character, client.offset_encoding)
    if from > col or to < col then
      return nil
    end
    local typed = line:sub(from + 1, col)
    if insert:sub(1, #typed) ~= typed then
      return nil
    end
    insert = insert:sub(#typed + 1)
    replace_end = to
  end
  if insert == '' then
    return nil
  end
  return {
    row = row,
    col = col,
    tick = api.nvim_buf_get_changedtick(buf),
    text = insert,
    replace_end = replace_end,
    client_id = client.id,
    command = item.command,
    snippet = snippet,
  }
end

local function on_reply(buf, seq, client_id, err, result)
  local st = buffers[buf]
  if not st or not api.nvim_buf_is_valid(buf) then
    return
  end
  local req = st.pending
  if seq ~= st.seq or not req or req.seq ~= seq then
    st.stats.stale = st.stats.stale + 1
    return
  end
  st.pending = nil
  if err then
    st.stats.errors = st.stats.errors + 1
    return
  end
  local row, col = cursor(buf)
  if not in_insert_mode() or row ~= req.row or col ~= req.col or api.nvim_buf_get_changedtick(buf) ~= req.tick then
    st.stats.stale = st.stats.stale + 1
    return
  end
  local client = vim.lsp.get_client_by_id(client_id)
  if not client then
    return
  end
  st.stats.replies = st.stats.replies + 1
  local items = type(result) == 'table' and (result.items or result) or {}
  for _, item in ipairs(items) do
    local g = ghost_from_item(buf, client, item, row, col)
    if g then
      show(buf, st, g)
      return
    end
  end
end

--- Ask the server for a suggestion at the cursor now (kind: 1 invoked, 2 automatic). Any request
--- still in flight for this buffer is cancelled first: the newest request wins.
---@return boolean sent
function M.request(buf, kind)
  buf = (buf == nil or buf == 0) and api.nvim_get_current_buf() or buf
  local st = buffers[buf]
  local client = client_for(buf)
  local row, col = cursor(buf)
  if not st or not client or not row then
    return false
  end
  stop_timer(st)
  invalidate(buf, st)
  local seq = st.seq
  local tick = api.nvim_buf_get_changedtick(buf)
  local params = vim.lsp.util.make_position_params(0, client.offset_encoding)
  params.context = { triggerKind = kind or INVOKED }
  local client_id = client.id
  local ok, id = compat.request(client, 'textDocument/inlineCompletion', params, function(err, result)
    on_reply(buf, seq, client_id, err, result)
  end, buf)
  if not ok or not id then
    return false
  end
  st.pending = { client_id = client_id, id = id, seq = seq, tick = tick, row = row, col = col }
  st.key = ('%d:%d:%d'):format(tick, row, col)
  st.stats.requests = st.stats.requests + 1
  return true
end

local function schedule_request(buf, st)
  if not st.timer then
    st.timer = vim.uv.new_timer()
  end
  st.timer:stop()
  st.timer:start(
    config.debounce_ms,
    0,
    vim.schedule_wrap(function()
      if buffers[buf] == st and api.nvim_get_current_buf() == buf and in_insert_mode() then
        M.request(buf, AUTOMATIC)
      end
    end)
  )
end

local function auto_enabled(buf)
  return config.auto_trigger and vim.b[buf].offpilot_auto_trigger ~= false and vim.g.offpilot_enabled ~= false
end

--- After a keystroke or a cursor move in insert mode: drop a suggestion that no longer applies, cancel
--- the request in flight for an older state, and (auto-trigger) ask again after a short debounce.
local function refresh(buf)
  local st = buffers[buf]
  if not st or not in_insert_mode() then
    return
  end
  if current(buf, st.ghost) then
    return -- unchanged, or our own accept edit (which re-showed the rest)
  end
  local row, col = cursor(buf)
  if not row then
    return
  end
  local key = ('%d:%d:%d'):format(api.nvim_buf_get_changedtick(buf), row, col)
  if st.key == key then
    return -- already asked about exactly this state
  end
  invalidate(buf, st)
  if auto_enabled(buf) then
    schedule_request(buf, st)
  else
    stop_timer(st)
  end
end

local function reset(buf)
  local st = buffers[buf]
  if st then
    stop_timer(st)
    invalidate(buf, st)
    st.key = nil
  end
end

--- The suggestion shown at the cursor of the current buffer, if any.
---@return offpilot.Ghost?
function M.current(buf)
  buf = (buf == nil or buf == 0) and api.nvim_get_current_buf() or buf
  local st = buffers[buf]
  local g = st and st.ghost
  if current(buf, g) then
    return g
  end
end

function M.visible(buf)
  return M.current(buf) ~= nil
end

--- Insert all of the shown suggestion, its next line, or its next word. The rest of a partly accepted
--- suggestion stays shown. Must not run under textlock (from an <expr> mapping: vim.schedule it).
---@param kind? 'all'|'line'|'word'
---@return boolean accepted
function M.accept(kind, buf)
  buf = (buf == nil or buf == 0) and api.nvim_get_current_buf() or buf
  local st = buffers[buf]
  local g = M.current(buf)
  if not st or not g then
    return false
  end
  kind = kind or 'all'
  local piece = text.piece(g.text, kind)
  local rest = g.text:sub(#piece + 1)
  stop_timer(st)
  invalidate(buf, st)
  local win = api.nvim_get_current_win()
  if g.snippet and rest == '' and g.col == g.replace_end then
    vim.snippet.expand(piece)
  else
    local last = rest == '' and g.replace_end or g.col
    api.nvim_buf_set_text(buf, g.row, g.col, g.row, last, vim.split(piece, '\n', { plain = true }))
  end
  local row, col = text.end_of(g.row, g.col, piece)
  if not g.snippet then
    api.nvim_win_set_cursor(win, { row + 1, col })
  end
  st.stats.accepted = st.stats.accepted + 1
  if rest ~= '' then
    local tick = api.nvim_buf_get_changedtick(buf)
    show(buf, st, {
      row = row,
      col = col,
      tick = tick,
      text = rest,
      replace_end = col + (g.replace_end - g.col),
      client_id = g.client_id,
      command = g.command,
      snippet = g.snippet,
    })
    st.key = ('%d:%d:%d'):format(tick, row, col)
  elseif g.command then
    local client = vim.lsp.get_client_by_id(g.client_id)
    if client then
      compat.exec_cmd(client, g.command, buf)
    end
  end
  return true
end

--- Hide the suggestion and cancel the request in flight; the next keystroke asks again.
function M.dismiss(buf)
  buf = (buf == nil or buf == 0) and api.nvim_get_current_buf() or buf
  local st = buffers[buf]
  if not st then
    return false
  end
  local had = st.ghost ~= nil or st.pending ~= nil
  stop_timer(st)
  invalidate(buf, st)
  return had
end

--- Ask for a suggestion at the cursor now, whatever the auto-trigger says.
function M.trigger(buf)
  return M.request(buf, INVOKED)
end

--- The model finished loading: ask again where answers were empty because it was not ready.
function M.retry_all()
  for buf, st in pairs(buffers) do
    st.key = nil
    if buf == api.nvim_get_current_buf() and in_insert_mode() and not st.ghost and auto_enabled(buf) then
      schedule_request(buf, st)
    end
  end
end

function M.stats(buf)
  buf = (buf == nil or buf == 0) and api.nvim_get_current_buf() or buf
  local st = buffers[buf]
  return st and vim.deepcopy(st.stats) or nil
end

function M.attached(buf)
  return buffers[buf] ~= nil
end

function M.attach(buf)
  if buffers[buf] then
    return
  end
  buffers[buf] = {
    seq = 0,
    stats = { requests = 0, cancelled = 0, stale = 0, replies = 0, shown = 0, accepted = 0, errors = 0 },
  }
  local group = api.nvim_create_augroup('offpilot.ghost.' .. buf, { clear = true })
  api.nvim_create_autocmd({ 'TextChangedI', 'TextChangedP', 'CursorMovedI' }, {
    group = group,
    buffer = buf,
    callback = function()
      refresh(buf)
    end,
  })
  api.nvim_create_autocmd('InsertEnter', {
    group = group,
    buffer = buf,
    callback = function()
      vim.schedule(function() -- once the mode and the cursor are those of insert mode
        refresh(buf)
      end)
    end,
  })
  api.nvim_create_autocmd({ 'InsertLeave', 'BufLeave' }, {
    group = group,
    buffer = buf,
    callback = function()
      reset(buf)
    end,
  })
  api.nvim_create_autocmd({ 'BufUnload', 'BufWipeout' }, {
    group = group,
    buffer = buf,
    callback = function()
      M.detach(buf)
    end,
  })
end

function M.detach(buf)
  local st = buffers[buf]
  if not st then
    return
  end
  reset(buf)
  if st.timer then
    st.timer:stop()
    st.timer:close()
    st.timer = nil
  end
  buffers[buf] = nil
  pcall(api.nvim_del_augroup_by_name, 'offpilot.ghost.' .. buf)
end

return M
