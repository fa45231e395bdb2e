-- Neovim 0.12+: the built-in vim.lsp.inline_completion shows and accepts the server's suggestions; this
-- module only adds accept line / accept word (through get()'s on_accept), dismiss and trigger.
local api = vim.api
local text = require('offpilot.text')

local M = {}

function M.available()
  local ic = vim.lsp.inline_completion
  return type(ic) == 'table' and type(ic.enable) == 'function' and type(ic.get) == 'function'
end

local function namespace()
  return api.nvim_get_namespaces()['nvim.lsp.inline_completion']
end

function M.attach(buf, client)
  local ok = pcall(vim.lsp.inline_completion.enable, true, { bufnr = buf, client_id = client.id })
  if not ok then
    pcall(vim.lsp.inline_completion.enable, true, { bufnr = buf })
  end
end

function M.detach(buf)
  pcall(vim.lsp.inline_completion.enable, false, { bufnr = buf })
end

--- Whether Neovim shows a suggestion in the current buffer.
function M.visible(buf)
  buf = (buf == nil or buf == 0) and api.nvim_get_current_buf() or buf
  local ns = namespace()
  return ns ~= nil and #api.nvim_buf_get_extmarks(buf, ns, 0, -1, { limit = 1 }) > 0
end

--- Insert part of a built-in inline completion item (called scheduled, by get()'s on_accept).
local function insert_part(item, kind)
  local buf = api.nvim_get_current_buf()
  local win = api.nvim_get_current_win()
  local insert = item.insert_text
  if type(insert) ~= 'string' then
    vim.snippet.expand(insert.value) -- a snippet goes in whole
    return
  end
  local pos = api.nvim_win_get_cursor(win)
  local row, col = pos[1] - 1, pos[2]
  local last_row, last_col = row, col
  local range = item.range
  if range then
    local start_row, start_col = range.start.row, range.start.col
    local line = api.nvim_buf_get_lines(buf, start_row, start_row + 1, false)[1] or ''
    local typed = start_row == row and col >= start_col and line:sub(start_col + 1, col) or nil
    if typed and insert:sub(1, #typed) == typed then
      insert = insert:sub(#typed + 1) -- the user typed the start of the suggestion since it was asked for
      last_row, last_col = range.end_.row, math.max(range.end_.col, col)
    else
      row, col, last_row, last_col = start_row, start_col, range.end_.row, range.end_.col
    end
  end
  local piece = text.piece(insert, kind)
  if piece ~= insert then
    last_row, last_col = row, col -- only the last part replaces the item's range
  end
  api.nvim_buf_set_text(buf, row, col, last_row, last_col, vim.split(piece, '\n', { plain = true }))
  local end_row, end_col = text.end_of(row, col, piece)
  api.nvim_win_set_cursor(win, { end_row + 1, end_col })
  if piece == insert and item.command then
    local client = vim.lsp.get_client_by_id(item.client_id)
    if client then
      require('offpilot.compat').exec_cmd(client, item.command, buf)
    end
  end
end

--- Accept all, the next line or the next word; true when a suggestion was shown. Safe in <expr>
--- mappings: get() schedules the edit itself.
---@param kind? 'all'|'line'|'word'
function M.accept(kind)
  if not kind or kind == 'all' then
    return vim.lsp.inline_completion.get() == true
  end
  return vim.lsp.inline_completion.get({
    on_accept = function(item)
      insert_part(item, kind)
    end,
  }) == true
end

function M.dismiss(buf)
  buf = (buf == nil or buf == 0) and api.nvim_get_current_buf() or buf
  if not M.visible(buf) then
    return false
  end
  -- There is no public "hide": turning it off for the buffer clears it; turn it on again at once.
  M.detach(buf)
  vim.lsp.inline_completion.enable(true, { bufnr = buf })
  return true
end

--- Ask again at the cursor: the built-in requests on cursor moves in insert mode (debounced).
function M.trigger(buf)
  buf = (buf == nil or buf == 0) and api.nvim_get_current_buf() or buf
  api.nvim_exec_autocmds('CursorMovedI', { buffer = buf, modeline = false })
  return true
end

return M
