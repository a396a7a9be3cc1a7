#!lua name=ws_notify
-- ws-notify's Redis Functions library (Redis 7.0+). README: "Publishing with history".
--
-- FCALL ws_notify_publish 1 <channel> <message>
--   <channel>  the user's channel, e.g. user_noti:alice; the user's history is a
--              stream under the same key name (keys and channels are separate
--              namespaces; the same name keeps both in one Redis Cluster slot)
--   <message>  a JSON object: {"type":"...","payload":...}
-- Appends the message to the stream (capped at about HISTORY_SIZE entries, the
-- whole stream expiring HISTORY_TTL_SECONDS after its last message), then
-- publishes it on the channel with "id":"<stream id>" spliced in as its first
-- member (the other bytes unchanged), and returns the id.
--
-- FCALL ws_notify_spublish 1 <channel> <message>
--   the same, published with SPUBLISH (sharded pub/sub, Redis Cluster:
--   REDIS_SUBSCRIBE_MODE=sharded); call it on the master that owns the
--   channel's slot, which is also where the stream lives.
--
-- The gateway loads this library with the two values below replaced by its
-- WS_HISTORY_SIZE and WS_HISTORY_TTL (`ws-notify history-function` prints it so).
local HISTORY_SIZE = 100
local HISTORY_TTL_SECONDS = 86400

-- Appends and publishes with `publish_command` (PUBLISH or SPUBLISH); `name`
-- is the function's name for error replies.
local function append_and_publish(name, publish_command, keys, args)
  local key = keys[1]
  local message = args[1]
  if key == nil or message == nil or #keys ~= 1 or #args ~= 1 then
    return redis.error_reply('ERR usage: FCALL ' .. name .. ' 1 <channel> <json-object>')
  end
  -- Everything after the object's opening brace (JSON whitespace may precede it).
  local rest = string.match(message, '^[ \t\r\n]*{(.*)$')
  if rest == nil then
    return redis.error_reply('ERR ' .. name .. ': the message is not a JSON object')
  end
  local id = redis.call('XADD', key, 'MAXLEN', '~', HISTORY_SIZE, '*', 'm', message)
  redis.call('EXPIRE', key, HISTORY_TTL_SECONDS)
  local separator = ','
  if string.match(rest, '^[ \t\r\n]*}') then
    separator = ''
  end
  redis.call(publish_command, key, '{"id":"' .. id .. '"' .. separator .. rest)
  return id
end

local function ws_notify_publish(keys, args)
  return append_and_publish('ws_notify_publish', 'PUBLISH', keys, args)
end

local function ws_notify_spublish(keys, args)
  return append_and_publish('ws_notify_spublish', 'SPUBLISH', keys, args)
end

redis.register_function('ws_notify_publish', ws_notify_publish)
redis.register_function('ws_notify_spublish', ws_notify_spublish)
