-- :checkhealth offpilot
local M = {}

function M.check()
  local health = vim.health
  local offpilot = require('offpilot')

  health.start('offpilot: Neovim')
  local version = tostring(vim.version())
  if vim.fn.has('nvim-0.10') == 1 then
    health.ok('Neovim ' .. version)
  else
    health.error('Neovim ' .. version .. ' is too old', { 'offpilot needs Neovim 0.10 or newer' })
  end
  if require('offpilot.native').available() and offpilot.config.native ~= false then
    health.ok('suggestions shown by vim.lsp.inline_completion (Neovim 0.12+)')
  else
    health.ok('suggestions shown as extmark ghost text')
  end

  health.start('offpilot: server command')
  local cmd, source = offpilot.server_command()
  if not cmd then
    health.error('no server command: ' .. source, { 'run scripts/setup in the offpilot repository, or pass cmd to setup()' })
  elseif vim.fn.executable(cmd[1]) == 1 then
    health.ok(('server command (%s): %s'):format(source, table.concat(cmd, ' ')))
  else
    health.error(('server command (%s) is not executable: %s'):format(source, cmd[1]))
  end

  health.start('offpilot: server')
  local clients = vim.lsp.get_clients({ name = offpilot.client_name })
  if #clients == 0 then
    health.warn('no offpilot server is running', {
      'open a file of one of these filetypes: ' .. table.concat(offpilot.config.filetypes, ', '),
      'and check that require("offpilot").setup() runs in your config',
    })
    return
  end
  for _, client in ipairs(clients) do
    local buffers = vim.tbl_keys(client.attached_buffers or {})
    health.info(('client %d, position encoding %s, %d buffer(s) attached'):format(client.id, client.offset_encoding, #buffers))
    local status, err = offpilot.status(client, 3000)
    if not status then
      health.error(('offpilot/status got no answer: %s'):format(err))
    else
      local line = ('server state: %s; model: %s'):format(tostring(status.state), tostring(status.model))
      if status.detail and status.detail ~= '' and status.detail ~= vim.NIL then
        line = line .. ' (' .. tostring(status.detail) .. ')'
      end
      if status.state == 'ready' then
        health.ok(line)
      elseif status.state == 'loading' or status.state == 'stopped' then
        health.warn(line, { 'the model is still loading; suggestions start when it is ready' })
      elseif status.state == 'backoff' then
        health.warn(line, { 'the model worker stopped and is being restarted' })
      else
        health.error(line, { 'see `offpilot doctor` and the LSP log (:LspLog / vim.lsp.log.get_filename())' })
      end
      if type(status.cache) == 'table' and status.cache.enabled ~= nil then
        health.info(('response cache: %s'):format(status.cache.enabled and 'on' or 'off'))
      end
    end
  end
end

return M
