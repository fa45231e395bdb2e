-- :Offpilot explain / refactor: the server's offpilot.explain and offpilot.refactor commands for the
-- cursor (the function or class around it), a line range or the visual selection. The server finds the
-- code, builds the prompt, runs the model and sends the edit (workspace/applyEdit); this module only
-- names the place, in the client's position encoding, and shows the answer.
local api = vim.api
local compat = require('offpilot.compat')

local M = {}

M.client_name = 'offpilot'

local function client_for(buf)
  return vim.lsp.get_clients({ bufnr = buf, name = M.client_name })[1]
end

--- The LSP character of byte column `col` (0-based) on row `row` (0-based), in `encoding`.
local function character(buf, row, col, encoding)
  if col <= 0 then
    return 0
  end
  return vim.lsp.util.character_offset(buf, row, col, encoding)
end

local function line_text(buf, row)
  return api.nvim_buf_get_lines(buf, row, row + 1, false)[1] or ''
end

--- Whole lines `first`..`last` (1-based, inclusive).
local function lines_range(buf, first, last, encoding)
  if last < first then
    first, last = last, first
  end
  local last_line = line_text(buf, last - 1)
  return {
    start = { line = first - 1, character = 0 },
    ['end'] = { line = last - 1, character = character(buf, last - 1, #last_line, encoding) },
  }
end

--- Characters from {row, col} to {row, col} (mark-like: 1-based rows, 0-based byte columns), the end
--- character included ('selection' inclusive) or not ('selection' exclusive).
local function chars_range(buf, from, to, encoding)
  if to[1] < from[1] or (to[1] == from[1] and to[2] < from[2]) then
    from, to = to, from
  end
  local start_line = line_text(buf, from[1] - 1)
  local end_line = line_text(buf, to[1] - 1)
  local start_col = math.min(math.max(from[2], 0), #start_line)
  local end_col = math.min(math.max(to[2], 0), #end_line)
  if vim.o.selection ~= 'exclusive' and end_col < #end_line then
    -- After the last selected character, whatever its length in bytes (an LSP range's end is exclusive).
    end_col = end_col + #vim.fn.strpart(end_line, end_col, 1, 1)
  end
  return {
    start = { line = from[1] - 1, character = character(buf, from[1] - 1, start_col, encoding) },
    ['end'] = { line = to[1] - 1, character = character(buf, to[1] - 1, end_col, encoding) },
  }
end

local function leave_visual_mode()
  api.nvim_feedkeys(api.nvim_replace_termcodes('<Esc>', true, false, true), 'nx', false)
end

--- `{ uri, range }` for a command: opts.line1/line2 (a command's line range), opts.range (like
--- vim.lsp.buf.code_action()'s: { start = {row, col}, ['end'] = {row, col} }, mark-like), the visual
--- selection when called in visual mode, else the cursor (the server takes the definition around it).
---@return table
function M.target(client, buf, opts)
  opts = opts or {}
  local encoding = client.offset_encoding or 'utf-16'
  local range
  if opts.line1 and opts.line2 then
    range = lines_range(buf, opts.line1, opts.line2, encoding)
  elseif opts.range then
    range = chars_range(buf, opts.range.start, opts.range['end'], encoding)
  else
    local mode = api.nvim_get_mode().mode
    if mode == 'v' or mode == 'V' or mode == '\22' then
      local from, to = vim.fn.getpos('v'), vim.fn.getpos('.')
      if mode == 'v' then
        range = chars_range(buf, { from[2], from[3] - 1 }, { to[2], to[3] - 1 }, encoding)
      else -- linewise, or a block: its lines
        range = lines_range(buf, from[2], to[2], encoding)
      end
      leave_visual_mode()
    else
      range = vim.lsp.util.make_range_params(0, encoding).range
    end
  end
  return { uri = vim.uri_from_bufnr(buf), range = range }
end

local function attached(opts)
  local buf = (opts.bufnr == nil or opts.bufnr == 0) and api.nvim_get_current_buf() or opts.bufnr
  local client = client_for(buf)
  if not client then
    vim.notify('offpilot: the server is not attached to this buffer', vim.log.levels.WARN)
  end
  return client, buf
end

local function execute(client, buf, command, argument, on_result)
  local params = { command = command, arguments = { argument } }
  return compat.request(client, 'workspace/executeCommand', params, function(err, result)
    require('offpilot').report_error(err)
    -- Refusals (nothing to act on, the document changed, no usable edit) come as the server's own
    -- window/showMessage, so they are not repeated here.
    if on_result then
      on_result(err, result)
    end
  end, buf)
end

--- Explain the code at the cursor (or the range / selection) in a floating window.
---@param opts? { bufnr?: integer, line1?: integer, line2?: integer, range?: table, on_result?: function }
function M.explain(opts)
  opts = opts or {}
  local client, buf = attached(opts)
  if not client then
    return false
  end
  local argument = M.target(client, buf, opts)
  return execute(client, buf, 'offpilot.explain', argument, function(err, result)
    if not err then
      require('offpilot').show_result(result)
    end
    if opts.on_result then
      opts.on_result(err, result)
    end
  end)
end

--- Refactor the code at the cursor (or the range / selection) towards a goal: opts.instruction, else
--- asked for with vim.ui.input (empty: the server's default goal; cancelled: nothing is sent). The
--- server applies the edit through workspace/applyEdit.
---@param opts? { bufnr?: integer, line1?: integer, line2?: integer, range?: table, instruction?: string,
---  on_result?: function }
function M.refactor(opts)
  opts = opts or {}
  local client, buf = attached(opts)
  if not client then
    return false
  end
  local argument = M.target(client, buf, opts) -- before the prompt: it leaves visual mode
  local function send(instruction)
    argument.instruction = instruction
    execute(client, buf, 'offpilot.refactor', argument, opts.on_result)
  end
  if type(opts.instruction) == 'string' then
    send(opts.instruction)
    return true
  end
  vim.ui.input({ prompt = 'offpilot refactor, goal (empty: simpler and clearer): ' }, function(input)
    if input == nil then
      return -- cancelled
    end
    vim.schedule(function()
      if api.nvim_buf_is_valid(buf) and client_for(buf) then
        send(input)
      end
    end)
  end)
  return true
end

return M
