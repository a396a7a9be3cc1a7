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
-- The gateway loads this library with the two values below replaced by its
-- WS_HISTORY_SIZE and WS_HISTORY_TTL (`ws-notify history-function` prints it so).
local HISTORY_SIZE = 100
local HISTORY_TTL_SECONDS = 86400

local function ws_notify_publish(keys, args)
  local key = keys[1]
  local message = args[1]
  if key == nil or message == nil or #keys ~= 1 or #args ~= 1 then
    return redis.error_reply('ERR usage: FCALL ws_notify_publish 1 <channel> <json-object>')
  end
  -- Everything after the object's opening brace (JSON whitespace may precede it).
  local rest = string.match(message, '^[ \t\r\n]*{(.*)$')
  if rest == nil then
    return redis.error_reply('ERR ws_notify_publish: the message is not a JSON object')
  end
  local id = redis.call('XADD', key, 'MAXLEN', '~', HISTORY_SIZE, '*', 'm', message)
  redis.call('EXPIRE', key, HISTORY_TTL_SECONDS)
  local separator = ','
  if string.match(rest, '^[ \t\r\n]*}') then
    separator = ''
  end
  redis.call('PUBLISH', key, '{"id":"' .. id .. '"' .. separator .. rest)
  return id
end

redis.register_function('ws_notify_publish', ws_notify_publish)
