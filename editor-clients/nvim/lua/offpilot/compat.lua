-- The few vim.lsp.Client calls whose form changed in Neovim 0.11 (methods instead of closures).
local M = {}

M.has_011 = vim.fn.has('nvim-0.11') == 1

---@return boolean ok, integer? request_id
function M.request(client, method, params, handler, bufnr)
  if M.has_011 then
    return client:request(method, params, handler, bufnr)
  end
  return client.request(method, params, handler, bufnr)
end

---@return {err: table?, result: any}?, string?
function M.request_sync(client, method, params, timeout_ms, bufnr)
  if M.has_011 then
    return client:request_sync(method, params, timeout_ms, bufnr)
  end
  return client.request_sync(method, params, timeout_ms, bufnr)
end

function M.notify(client, method, params)
  if M.has_011 then
    return client:notify(method, params)
  end
  return client.notify(method, params)
end

function M.cancel_request(client, id)
  if M.has_011 then
    return client:cancel_request(id)
  end
  return client.cancel_request(id)
end

--- Runs an LSP command (an inline completion item's `command`, say) the way code actions do.
function M.exec_cmd(client, command, bufnr)
  if client.exec_cmd then
    return client:exec_cmd(command, { bufnr = bufnr })
  elseif client._exec_cmd then
    return client:_exec_cmd(command, { bufnr = bufnr })
  end
end

function M.stop(client, force)
  if M.has_011 then
    return client:stop(force)
  end
  return client.stop(force)
end

function M.is_stopped(client)
  if M.has_011 then
    return client:is_stopped()
  end
  return client.is_stopped()
end

return M
