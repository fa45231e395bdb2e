-- Pure text helpers shared by the extmark ghost text and the Neovim 0.12+ path: how much of a suggestion
-- "accept word" and "accept line" take, and LSP positions to byte columns.
local M = {}

--- The part of `text` that "accept line" inserts: up to (not including) the first line break; when the
--- suggestion starts with a line break (the rest of the current line was accepted already), the break
--- and the whole next line.
---@param text string
---@return string
function M.next_line(text)
  local first_break = text:find('\n', 1, true)
  if not first_break then
    return text
  end
  if first_break > 1 then
    return text:sub(1, first_break - 1)
  end
  local second_break = text:find('\n', 2, true)
  return second_break and text:sub(1, second_break - 1) or text
end

--- The part of `text` that "accept word" inserts: leading blanks (line breaks included), then one run
--- of identifier characters or one run of other non-blank characters.
---@param text string
---@return string
function M.next_word(text)
  local blanks = text:match('^%s*')
  local rest = text:sub(#blanks + 1)
  if rest == '' then
    return text
  end
  local word = rest:match('^[%w_\128-\255]+') or rest:match('^[^%w_%s\128-\255]+')
  return blanks .. word
end

--- The piece of `text` that an accept of `kind` ('all', 'line' or 'word') inserts.
---@param text string
---@param kind 'all'|'line'|'word'
---@return string
function M.piece(text, kind)
  if kind == 'line' then
    return M.next_line(text)
  elseif kind == 'word' then
    return M.next_word(text)
  end
  return text
end

--- Where the cursor stands after `piece` is inserted at (row, col): 0-based row, byte column.
---@return integer row, integer col
function M.end_of(row, col, piece)
  local lines = vim.split(piece, '\n', { plain = true })
  if #lines == 1 then
    return row, col + #piece
  end
  return row + #lines - 1, #lines[#lines]
end

--- The byte column of an LSP position's `character` on `line_text`, in the client's position encoding.
---@param line_text string
---@param character integer
---@param encoding string 'utf-8' | 'utf-16' | 'utf-32'
---@return integer
function M.byte_col(line_text, character, encoding)
  if encoding == 'utf-8' or character == 0 then
    return math.min(character, #line_text)
  end
  local ok, col
  if vim.fn.has('nvim-0.11') == 1 then
    ok, col = pcall(vim.str_byteindex, line_text, encoding, character, false)
  else
    ok, col = pcall(vim.str_byteindex, line_text, character, encoding == 'utf-16')
  end
  if not ok then
    return #line_text
  end
  return col
end

return M
