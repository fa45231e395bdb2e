-- :Offpilot {status|enable|disable|toggle|restart|explain|refactor|cancel}. Nothing starts until
-- require('offpilot').setup().
if vim.g.loaded_offpilot then
  return
end
vim.g.loaded_offpilot = true

vim.api.nvim_set_hl(0, 'OffpilotGhost', { link = 'Comment', default = true })

local subcommands = {
  status = function()
    local offpilot = require('offpilot')
    local status, err = offpilot.status()
    if not status then
      vim.notify('offpilot: ' .. err, vim.log.levels.WARN)
      return
    end
    offpilot.show_markdown('# offpilot status\n\n```json\n' .. vim.json.encode(status) .. '\n```')
  end,
  enable = function()
    vim.g.offpilot_enabled = true
  end,
  disable = function()
    vim.g.offpilot_enabled = false
    pcall(require('offpilot').dismiss)
  end,
  toggle = function()
    vim.g.offpilot_enabled = vim.g.offpilot_enabled == false
    vim.notify('offpilot suggestions while typing: ' .. (vim.g.offpilot_enabled and 'on' or 'off'))
  end,
  restart = function()
    local offpilot = require('offpilot')
    local buffers = {}
    for _, client in ipairs(vim.lsp.get_clients({ name = offpilot.client_name })) do
      vim.list_extend(buffers, vim.tbl_keys(client.attached_buffers or {}))
      require('offpilot.compat').stop(client)
    end
    vim.defer_fn(function()
      for _, buf in ipairs(buffers) do
        if vim.api.nvim_buf_is_valid(buf) then
          offpilot.start(buf)
        end
      end
    end, 500)
  end,
  -- [range]Offpilot explain: the function or class at the cursor, or the lines, in a float.
  explain = function(args)
    require('offpilot').explain({
      line1 = args.range > 0 and args.line1 or nil,
      line2 = args.range > 0 and args.line2 or nil,
    })
  end,
  -- [range]Offpilot refactor [goal]: without a goal, it is asked for (empty: the default goal).
  refactor = function(args)
    local goal = table.concat(vim.list_slice(args.fargs, 2), ' ')
    require('offpilot').refactor({
      line1 = args.range > 0 and args.line1 or nil,
      line2 = args.range > 0 and args.line2 or nil,
      instruction = goal ~= '' and goal or nil,
    })
  end,
  cancel = function()
    if require('offpilot').cancel() == 0 then
      vim.notify('offpilot: no action is running')
    end
  end,
}

vim.api.nvim_create_user_command('Offpilot', function(args)
  local sub = subcommands[args.fargs[1] or 'status']
  if not sub then
    vim.notify('offpilot: unknown subcommand ' .. args.fargs[1], vim.log.levels.ERROR)
    return
  end
  sub(args)
end, {
  nargs = '*',
  range = true,
  desc = 'offpilot: status, enable, disable, toggle, restart, explain, refactor, cancel',
  complete = function(lead, line)
    local words = vim.split(line, '%s+', { trimempty = true })
    if #words > (lead == '' and 1 or 2) then
      return {} -- a subcommand's arguments (refactor's goal)
    end
    local names = vim.tbl_filter(function(name)
      return vim.startswith(name, lead)
    end, vim.tbl_keys(subcommands))
    table.sort(names)
    return names
  end,
})
