#!lua name=pushfw
--[[
pushfw: the seed's commands (RedisPushIptables: drop_insert, ttl_drop_insert, ...) as
Redis Functions (Redis >= 7). Each one appends the equivalent command to the pushfw stream
and returns the entry id; the pushfw workers validate and apply it like any other entry.

  FCALL drop_insert 1 {pushfw}:cmd 192.168.1.6                  cluster-correct form
  FCALL drop_insert 0 192.168.1.6                               the seed's form: {pushfw}:cmd
  FCALL ttl_drop_insert 1 {pushfw}:cmd 192.168.1.6 600 "ssh brute force"

Each op marked fcall in pushfw.producer.ops is a function named as the seed spelt it
(drop_insert, accept_delete, ttl_drop_insert, ...): a ttl op takes <ip> <ttl> [reason],
the others <ip> [reason].

Only the argument count, the stream key's name and that ttl is digits are checked here:
everything else (the address, the ttl's range, the reason) is the workers' job, which
report a bad command as "rejected" in the results stream. Installed and replaced by
`pushfw redis-functions install` (FUNCTION LOAD REPLACE).
]]

local DEFAULT_STREAM = '{pushfw}:cmd'

-- one row per op with fcall=True in pushfw.producer.ops, rendered by functions.py at load:
-- {name = "drop_insert", op = "drop.insert", timed = false}, ...
local COMMANDS = {}

local function usage(spec)
    local args = spec.timed and '<ip> <ttl> [reason]' or '<ip> [reason]'
    -- (concatenation, not string.format: the loading sandbox of Redis 7.0 has no string)
    return 'FCALL ' .. spec.name .. ' 1 ' .. DEFAULT_STREAM .. ' ' .. args
        .. ' (or numkeys 0 for ' .. DEFAULT_STREAM .. ')'
end

local function error_reply(spec, what)
    return redis.error_reply(string.format(
        "ERR pushfw %s: %s; usage: %s", spec.name, what, usage(spec)))
end

local function handler(spec)
    local required = spec.timed and 2 or 1
    return function(keys, args)
        local stream = DEFAULT_STREAM
        if #keys > 1 then
            return error_reply(spec, string.format("takes one key, the stream (got %d)", #keys))
        elseif #keys == 1 then
            stream = keys[1]
            if string.sub(stream, -4) ~= ':cmd' then
                return error_reply(spec, "the key must be the command stream (<prefix>:cmd)")
            end
        end
        if #args < required or #args > required + 1 then
            return error_reply(spec, string.format(
                "wrong number of arguments (got %d, expected %d or %d)",
                #args, required, required + 1))
        end
        local fields = {'op', spec.op, 'ip', args[1]}
        if spec.timed then
            if not string.match(args[2], '^%d+$') then
                return error_reply(spec, "ttl must be a whole number of seconds")
            end
            table.insert(fields, 'ttl')
            table.insert(fields, args[2])
        end
        if #args > required then
            table.insert(fields, 'reason')
            table.insert(fields, args[required + 1])
        end
        table.insert(fields, 'origin')
        table.insert(fields, 'fcall')
        return redis.call('XADD', stream, '*', unpack(fields))
    end
end

--[[
list_store: how a producer stores a list's content (`pushfw import`, Producer.load_list).

  FCALL list_store 1 {pushfw}:list:<name>:<version> <packed content>

A content key is written once: as a new string with no expiry, or left as it is when it
already holds the same bytes (an import of the same version again; an expiry the ledger gave
that version is lifted, so the command sent next finds its content). Anything else there, a
stream, a hash, other bytes, is an error, and nothing is changed. The producer's ACL (`pushfw
acl`) grants no other write on these keys; Redis checks each call below against the
caller's ACL, so the producer holds SETNX and PERSIST there, which cannot overwrite, set an
expiry or change a type either. The workers check the bytes (format, hash, order).
]]
local function list_store(keys, args)
    if #keys ~= 1 or #args ~= 1 then
        return redis.error_reply(
            'ERR pushfw list_store: usage: FCALL list_store 1 <prefix>:list:<name>:<version> <content>')
    end
    local key = keys[1]
    if not string.match(key, ':list:[a-z][a-z0-9_]*:' .. string.rep('%x', 32) .. '$') then
        return redis.error_reply('ERR pushfw list_store: ' .. key
            .. ' is not a list content key (<prefix>:list:<name>:<32 hex digits>)')
    end
    local kind = redis.call('TYPE', key)['ok']
    if kind == 'none' then
        redis.call('SETNX', key, args[1])
        return 1
    end
    if kind ~= 'string' or redis.call('GET', key) ~= args[1] then
        return redis.error_reply('ERR pushfw list_store: ' .. key .. ' already holds '
            .. (kind == 'string' and 'other content' or ('a ' .. kind))
            .. '; nothing written (an administrator may DEL it)')
    end
    redis.call('PERSIST', key)
    return 0
end

redis.register_function{
    function_name = 'list_store',
    callback = list_store,
    description = 'pushfw: store a list version once (FCALL list_store 1 <content key> <content>)',
}

-- (a numeric loop: the loading sandbox of Redis 7.0 has no ipairs)
for i = 1, #COMMANDS do
    local spec = COMMANDS[i]
    redis.register_function{
        function_name = spec.name,
        callback = handler(spec),
        description = 'pushfw: ' .. spec.op .. ' (' .. usage(spec) .. ')',
    }
end
