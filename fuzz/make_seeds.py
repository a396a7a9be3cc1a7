#!/usr/bin/env python3
"""Writes the seed corpus fuzz/corpus/<target>/ (committed; rerun after changing it).

Existing files are overwritten, others are kept: the corpus also holds inputs the
fuzzer found that are worth keeping (edge cases once mishandled by the checks).

The input layouts are described in fuzz/checks.rs and fuzz/README.md. Tokens are
signed with the fuzz targets' secret (checks::SECRET) and expire in 2100, so the
seeds stay valid. Only the standard library is used.
"""

import base64
import hashlib
import hmac
import json
import os
import struct

SECRET = b"fuzz-secret-7f3a9c2e-do-not-use"
WRONG_SECRET = b"fuzz-secret-7f3a9c2e-do-not-usf"
EXP_2100 = 4102444800
HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt(claims, header=None, secret=SECRET, alg="HS256") -> str:
    header = header if header is not None else {"alg": alg, "typ": "JWT"}
    h = header if isinstance(header, str) else json.dumps(header, separators=(",", ":"))
    c = claims if isinstance(claims, str) else json.dumps(claims, separators=(",", ":"))
    body = b64url(h.encode()) + "." + b64url(c.encode())
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    sig = hmac.new(secret, body.encode(), digest).digest()
    return body + "." + b64url(sig)


def write(target: str, name: str, data: bytes) -> None:
    directory = os.path.join(CORPUS, target)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, name), "wb") as f:
        f.write(data)


GOOD = jwt({"sub": "user-42", "exp": EXP_2100, "iat": 1764300000})
EXPIRED = jwt({"sub": "user-42", "exp": 1600000000})
FORGED = jwt({"sub": "admin", "exp": EXP_2100}, secret=WRONG_SECRET)
NONE_ALG = b64url(b'{"alg":"none","typ":"JWT"}') + "." + b64url(
    json.dumps({"sub": "admin", "exp": EXP_2100}).encode()) + "."


# --- handshake: byte 0 = rules and chunking, then the request ------------------------

def head(lines, body=b""):
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


CHROMIUM = [
    "GET /ws?token=%s HTTP/1.1" % GOOD,
    "Host: localhost:8081",
    "Connection: Upgrade",
    "Pragma: no-cache",
    "Cache-Control: no-cache",
    "User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36",
    "Upgrade: websocket",
    "Origin: https://app.example.com",
    "Sec-WebSocket-Version: 13",
    "Accept-Encoding: gzip, deflate, br, zstd",
    "Accept-Language: en-US,en;q=0.9",
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
    "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits",
]

FIREFOX = [
    "GET /ws HTTP/1.1",
    "Host: localhost:8081",
    "User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
    "Accept: */*",
    "Accept-Language: en-US,en;q=0.5",
    "Accept-Encoding: gzip, deflate, br, zstd",
    "Sec-WebSocket-Version: 13",
    "Origin: https://app.example.com",
    "Sec-WebSocket-Extensions: permessage-deflate",
    "Sec-WebSocket-Key: x3JJHMbDL1EzLkh9GBhXDw==",
    "Connection: keep-alive, Upgrade",
    "Cookie: _ga=GA1.1.1234567890.1764300000; jwt=%s; theme=dark" % GOOD,
    "Sec-Fetch-Dest: empty",
    "Sec-Fetch-Mode: websocket",
    "Sec-Fetch-Site: same-origin",
    "Pragma: no-cache",
    "Cache-Control: no-cache",
    "Upgrade: websocket",
]

SAFARI = [
    "GET /ws?token=%s HTTP/1.1" % GOOD,
    "Host: app.example.com",
    "Origin: https://app.example.com",
    "Upgrade: websocket",
    "Pragma: no-cache",
    "Cache-Control: no-cache",
    "Accept-Language: en-GB,en;q=0.9",
    "User-Agent: Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/18.1 Safari/605.1.15",
    "Sec-WebSocket-Version: 13",
    "Connection: Upgrade",
    "Sec-WebSocket-Key: 7EJbCdXo3o1aT0f4U3l1Vw==",
    "Sec-WebSocket-Extensions: permessage-deflate",
    "Accept-Encoding: gzip, deflate",
]

PYTHON_WEBSOCKETS = [
    "GET /ws HTTP/1.1",
    "Host: localhost:8081",
    "Upgrade: websocket",
    "Connection: Upgrade",
    "Sec-WebSocket-Key: 2PdOy9fYrMZ4nxUdYVGZHQ==",
    "Sec-WebSocket-Version: 13",
    "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits",
    "Authorization: Bearer %s" % GOOD,
    "User-Agent: Python/3.12 websockets/13.1",
]

GORILLA = [
    "GET /ws HTTP/1.1",
    "Host: gateway.internal:8081",
    "User-Agent: Go-http-client/1.1",
    "Connection: Upgrade",
    "Authorization: bearer %s" % jwt({"sub": "svc:billing", "exp": EXP_2100}, alg="HS512"),
    "Sec-WebSocket-Key: E4WSEcseoWr4csPLS2QJHA==",
    "Sec-WebSocket-Version: 13",
    "Upgrade: websocket",
]


def handshake_seeds():
    w = lambda name, control, data: write("handshake", name, bytes([control]) + data)
    w("chromium_upgrade_query_token", 0x00, head(CHROMIUM))
    w("chromium_upgrade_chunked", 0x05, head(CHROMIUM))
    w("chromium_upgrade_origin_list", 0x21, head(CHROMIUM))
    w("firefox_upgrade_cookie", 0x00, head(FIREFOX))
    w("firefox_upgrade_chunked", 0x13, head(FIREFOX))
    w("firefox_upgrade_user_limit", 0x42, head(FIREFOX))
    w("firefox_upgrade_server_full", 0x80, head(FIREFOX))
    w("safari_upgrade", 0x07, head(SAFARI))
    w("python_websockets_bearer", 0x00, head(PYTHON_WEBSOCKETS))
    w("gorilla_bearer_hs512", 0x09, head(GORILLA))
    # A resume: `since` is a stream id, or 400 `invalid since`.
    w("chromium_upgrade_since", 0x00,
      head([CHROMIUM[0].replace(" HTTP/1.1", "&since=1764680000000-3 HTTP/1.1")] + CHROMIUM[1:]))
    w("chromium_upgrade_bad_since", 0x00,
      head([CHROMIUM[0].replace(" HTTP/1.1", "&since=17x HTTP/1.1")] + CHROMIUM[1:]))
    # A first frame pipelined right after the head.
    w("upgrade_with_pipelined_frame", 0x02,
      head(PYTHON_WEBSOCKETS) + masked(0x1, b'{"type":"ping"}', b"\x37\xfa\x21\x3d"))
    w("lf_only_line_endings", 0x00,
      ("\n".join(PYTHON_WEBSOCKETS) + "\n\n").encode())
    w("lowercase_header_names", 0x00, head([
        "GET /ws?v=2&token=%s HTTP/1.1" % GOOD.replace(".", "%2E"),
        "host: localhost", "upgrade: WebSocket", "connection: upgrade",
        "sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==", "sec-websocket-version: 13"]))
    w("health_curl", 0x00, head([
        "GET /health HTTP/1.1", "Host: localhost:8081", "User-Agent: curl/8.5.0",
        "Accept: */*"]))
    w("health_kubelet", 0x03, head([
        "GET /health HTTP/1.1", "Host: 10.42.0.17:8081", "User-Agent: kube-probe/1.31",
        "Accept: */*", "Connection: close"]))
    w("health_head", 0x00, head(["HEAD /health HTTP/1.1", "Host: localhost"]))
    w("health_post", 0x00, head(["POST /health HTTP/1.1", "Host: localhost",
                                 "Content-Length: 0"]))
    w("metrics_prometheus", 0x00, head([
        "GET /metrics HTTP/1.1", "Host: 10.42.0.17:8081", "User-Agent: Prometheus/2.53.0",
        "Accept: application/openmetrics-text;version=1.0.0;q=0.5,"
        "text/plain;version=0.0.4;q=0.3,*/*;q=0.2",
        "Accept-Encoding: gzip", "X-Prometheus-Scrape-Timeout-Seconds: 10"]))
    w("metrics_json", 0x04, head(["GET /metrics?format=json HTTP/1.1", "Host: localhost"]))
    w("http10_upgrade", 0x00, head(["GET /ws HTTP/1.0"] + PYTHON_WEBSOCKETS[1:]))
    w("version_8", 0x00, head([l.replace(": 13", ": 8") for l in PYTHON_WEBSOCKETS]))
    w("bad_key", 0x00, head([l.replace("2PdOy9fYrMZ4nxUdYVGZHQ==", "short==")
                             for l in PYTHON_WEBSOCKETS]))
    w("no_upgrade_header", 0x00, head([l for l in PYTHON_WEBSOCKETS
                                       if not l.startswith("Upgrade")]))
    w("post_ws", 0x00, head(["POST /ws HTTP/1.1"] + PYTHON_WEBSOCKETS[1:]))
    w("missing_token", 0x00, head([l for l in PYTHON_WEBSOCKETS
                                   if not l.startswith("Authorization")]))
    w("expired_token", 0x00, head([l.replace(GOOD, EXPIRED) for l in PYTHON_WEBSOCKETS]))
    w("forged_token", 0x00, head([l.replace(GOOD, FORGED) for l in PYTHON_WEBSOCKETS]))
    w("alg_none_token", 0x00, head([l.replace(GOOD, NONE_ALG) for l in PYTHON_WEBSOCKETS]))
    w("wrong_origin", 0x20, head([l.replace("app.example.com", "evil.example")
                                  for l in CHROMIUM]))
    w("unknown_path", 0x00, head(["GET /favicon.ico HTTP/1.1", "Host: localhost"]))
    w("garbage", 0x00, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 TLS hello\r\n\r\n")
    w("partial_head", 0x01, b"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: webs")
    w("oversized_head", 0x00, head(["GET /ws HTTP/1.1", "Host: localhost",
                                    "X-Padding: " + "a" * 9000]))
    w("too_many_headers", 0x06, head(["GET /ws HTTP/1.1"] +
                                     ["X-H%d: v" % i for i in range(70)]))


# --- frames: byte 0 = flags, byte 1 = chunking seed, then client frames ---------------

def masked(opcode, payload, mask=b"\x12\x34\x56\x78", fin=True, rsv=0):
    first = (0x80 if fin else 0) | rsv | opcode
    n = len(payload)
    if n <= 125:
        header = bytes([first, 0x80 | n])
    elif n <= 0xFFFF:
        header = bytes([first, 0x80 | 126]) + struct.pack(">H", n)
    else:
        header = bytes([first, 0x80 | 127]) + struct.pack(">Q", n)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return header + mask + body


def close(code, reason=b"", mask=b"\x0a\x0b\x0c\x0d"):
    return masked(0x8, struct.pack(">H", code) + reason, mask)


def frames_seeds():
    w = lambda name, flags, seed, data: write("frames", name, bytes([flags, seed]) + data)
    ping_msg = masked(0x1, b'{"type":"ping"}', b"\x9c\x4e\x21\x07")
    session = (ping_msg + masked(0x9, b"hb-1") + masked(0xA, b"")
               + masked(0x1, b'{"type":"ack","id":17}', b"\x01\x02\x03\x04")
               + ping_msg + close(1000, b"bye"))
    w("session_ping_close", 0x00, 0x00, session)
    w("session_ping_close_chunked", 0x08, 0x2a, session)
    w("session_small_budget", 0x04, 0x11, session)
    w("session_pipelined", 0x18, 0x05, session)
    w("session_discarding", 0x01, 0x07, session)
    w("session_eof", 0x02, 0x03, ping_msg + masked(0x9, b""))
    w("text_ping_only", 0x00, 0x01, ping_msg)
    w("fragmented_text", 0x08, 0x02,
      masked(0x1, b'{"type":', fin=False) + masked(0x9, b"mid") +
      masked(0x0, b'"ping"}'))
    w("binary_frame", 0x00, 0x04, masked(0x2, bytes(range(40))))
    w("close_going_away", 0x08, 0x00, close(1001, "navigating away \u2192".encode()))
    w("close_no_code", 0x08, 0x00, masked(0x8, b""))
    w("close_bad_code_1005", 0x08, 0x00, close(1005))
    w("close_one_byte", 0x08, 0x00, masked(0x8, b"\x03"))
    w("close_invalid_utf8", 0x08, 0x00, close(1000, b"\xff\xfe"))
    w("too_big_text", 0x08, 0x09, masked(0x1, b"x" * 600))
    w("too_big_fragmented", 0x08, 0x0a,
      masked(0x1, b"a" * 300, fin=False) + masked(0x0, b"b" * 300))
    w("huge_length", 0x00, 0x00, bytes([0x82, 0xFF]) + struct.pack(">Q", 1 << 62) + b"\0" * 8)
    w("invalid_utf8_text", 0x08, 0x0b, masked(0x1, b"\xc3\x28 bad"))
    w("unmasked_text", 0x08, 0x0c, b"\x81\x05hello")
    w("reserved_opcode", 0x00, 0x0d, masked(0x3, b"?"))
    w("rsv_bit_set", 0x00, 0x0e, masked(0x1, b"hi", rsv=0x40))
    w("long_ping", 0x08, 0x0f, masked(0x9, b"p" * 126))
    w("fragmented_ping", 0x08, 0x10, masked(0x9, b"p", fin=False))
    w("continuation_first", 0x08, 0x12, masked(0x0, b"orphan"))
    w("many_pings", 0x08, 0x13, masked(0x9, b"0123456789" * 12) * 200)
    w("many_pings_slow_reader", 0x00, 0x14, masked(0x9, b"0123456789" * 12) * 200)
    w("pipelined_close", 0x10, 0x15, close(4000, b"app closing"))
    # Refresh requests: up to 8 KiB whatever the 512-byte message limit says, one
    # byte more closes with 1009; a flood past the rate window's room.
    def refresh(length):
        empty = len(b'{"type":"refresh","token":""}')
        return b'{"type":"refresh","token":"' + b"t" * (length - empty) + b'"}'
    w("refresh_8k", 0x08, 0x16, masked(0x1, refresh(8192)) + ping_msg)
    w("refresh_over_8k", 0x08, 0x17, masked(0x1, refresh(8193)))
    w("refresh_fragmented", 0x08, 0x18,
      masked(0x1, refresh(3000)[:1500], fin=False) + masked(0x0, refresh(3000)[1500:]))
    w("refresh_flood", 0x08, 0x19,
      masked(0x1, b'{"type":"refresh","token":"' + GOOD.encode() + b'"}') * 15)
    w("ordinary_600_bytes", 0x08, 0x1a,
      masked(0x1, b'{"type":"ping","pad":"' + b"x" * 575 + b'"}'))


# --- redis_message: <channel>\n<payload> -------------------------------------------

def redis_message_seeds():
    def w(name, channel, payload):
        if isinstance(payload, str):
            payload = payload.encode()
        write("redis_message", name, channel + b"\n" + payload)

    u = b"user_noti:user-42"
    w("order_shipped", u, '{"type":"order_shipped","payload":{"order_id":"A-1001",'
      '"carrier":"UPS","tracking":"1Z999AA10123456784","eta":"2026-12-01T10:00:00Z"}}')
    w("python_json_dumps", u, json.dumps(
        {"type": "invoice_paid", "payload": {"invoice": "INV-7", "amount": 129.5,
                                              "currency": "EUR"}}))
    w("missing_payload", u, '{"type":"logout"}')
    w("null_payload", u, '{"type":"refresh","payload":null}')
    w("extra_keys", u, '{"id":"evt_01","type":"chat.message","version":2,'
      '"payload":{"from":"bob","text":"hi"},"meta":{"trace":"abc"}}')
    w("history_id", u, '{"id":"1764680000000-0","type":"invoice_paid","payload":{"invoice":"INV-7"}}')
    w("history_id_twice", u, '{"id":"1-1","type":"t","id":"1-2"}')
    w("id_not_a_string", u, '{"id":7,"type":"t","payload":1}')
    w("nested", u, '{"type":"report","payload":{"a":[1,[2,[3,[4,{"b":{"c":[true,false,null]}}]]]]}}')
    w("unicode", b"user_noti:\xc3\xa9lodie", '{"type":"\u901a\u77e5","payload":{"text":'
      '"caf\\u00e9 \\ud83d\\ude00 \u2603","emoji":"\U0001F680"}}')
    w("escapes_in_type", u, '{"type":"a\\"b\\\\c\\n","payload":"line1\\nline2\\t\\u0000"}')
    w("whitespace", u, ' \t\r\n{ "payload" : [ 1 , 2 ] , "type" : "spaced" } \n')
    w("numbers", u, '{"type":"n","payload":[0,-0,1.5e-7,1E400,-12345678901234567890123,3.0]}')
    w("string_payload", u, '{"type":"s","payload":"just a string"}')
    w("colon_user_id", b"user_noti:tenant:7:user:9", '{"type":"t","payload":1}')
    w("big_payload", u, json.dumps({"type": "bulk", "payload": ["x" * 100] * 700}))
    w("not_json", u, "order shipped")
    w("array_top_level", u, '[{"type":"t"}]')
    w("type_number", u, '{"type":7,"payload":{}}')
    w("type_missing", u, '{"payload":{"a":1}}')
    w("duplicate_type", u, '{"type":"a","type":"b"}')
    w("duplicate_payload", u, '{"type":"a","payload":1,"payload":2}')
    w("trailing_garbage", u, '{"type":"a"} x')
    w("bom", u, b"\xef\xbb\xbf" + b'{"type":"a"}')
    w("invalid_utf8", u, b'{"type":"\xff"}')
    w("empty", u, b"")
    w("no_prefix", b"other:42", '{"type":"a"}')
    w("empty_user", b"user_noti:", '{"type":"a"}')
    # Lone surrogate escapes: valid JSON grammar (RFC 8259 section 8.2), passed through.
    w("lone_surrogates", u, '{"type":"\\ud800","payload":"\\udc00x"}')
    w("deep_nesting", u, '{"type":"d","payload":' + "[" * 300 + "]" * 300 + "}")
    w("deep_nesting_other_key", u, '{"type":"d","x":' + "[" * 300 + "]" * 300 + "}")


# --- token: byte 0 = mode, then header \n claims \n extra ------------------------------

def token_seeds():
    def w(name, mode, *fields):
        write("token", name, bytes([mode]) + "\n".join(fields).encode())

    hs256 = '{"alg":"HS256","typ":"JWT"}'
    claims = '{"sub":"user-42","exp":%d}' % EXP_2100
    w("bearer_hs256", 0x00, hs256, claims)
    w("cookie_hs256", 0x01, hs256, claims)
    w("query_hs256", 0x02, hs256, claims)
    w("query_percent_encoded", 0x42, hs256, claims)
    w("bearer_hs384", 0x10, '{"alg":"HS384","typ":"JWT"}', claims)
    w("bearer_hs512", 0x20, '{"alg":"HS512"}', claims)
    w("alg_from_header", 0x30, '{"typ":"JWT","alg":"HS512"}', claims)
    w("alg_mismatch", 0x10, hs256, claims)
    w("wrong_secret", 0x04, hs256, claims)
    w("wrong_secret_cookie_with_decoy", 0x85, hs256, claims)
    w("bearer_with_decoys", 0x80, hs256, claims)
    w("empty_signature", 0x08, hs256, claims)
    w("raw_signature", 0x0c, hs256, claims, "c2lnbmF0dXJl")
    w("alg_none", 0x08, '{"alg":"none","typ":"JWT"}', claims)
    w("crit_header", 0x00, '{"alg":"HS256","crit":["exp"]}', claims)
    w("kid_header", 0x00, '{"alg":"HS256","typ":"JWT","kid":"2026-11"}', claims)
    w("full_claims", 0x00, hs256, json.dumps({
        "sub": "user-42", "exp": EXP_2100, "iat": 1764300000, "nbf": 1764300000,
        "iss": "auth.example.com", "aud": ["ws", "api"], "jti": "8f14e45f",
        "roles": ["admin"], "name": "Ada"}))
    w("expired", 0x00, hs256, '{"sub":"user-42","exp":1600000000}')
    w("not_yet_valid", 0x00, hs256, '{"sub":"u","exp":%d,"nbf":%d}' % (EXP_2100, EXP_2100 - 1))
    w("exp_float", 0x00, hs256, '{"sub":"u","exp":%d.75}' % EXP_2100)
    w("exp_string", 0x00, hs256, '{"sub":"u","exp":"%d"}' % EXP_2100)
    w("exp_huge", 0x00, hs256, '{"sub":"u","exp":1e300}')
    w("sub_number", 0x00, hs256, '{"sub":42,"exp":%d}' % EXP_2100)
    w("sub_empty", 0x00, hs256, '{"sub":"","exp":%d}' % EXP_2100)
    w("sub_escaped", 0x00, hs256, '{"sub":"\\u00e9l\\u00e8ve\\n","exp":%d}' % EXP_2100)
    w("sub_unicode", 0x00, hs256, '{"sub":"\u00e9l\u00e8ve-\U0001F600","exp":%d}' % EXP_2100)
    w("duplicate_sub", 0x00, hs256, '{"sub":"a","sub":"b","exp":%d}' % EXP_2100)
    w("claims_array", 0x00, hs256, '[1,2]')
    w("claims_not_json", 0x00, hs256, 'not json')
    w("raw_bearer", 0x03, "Bearer " + GOOD, "", "")
    w("raw_bearer_lowercase_tab", 0x03, "bearer\t" + GOOD + " ", "", "")
    w("raw_basic_auth", 0x03, "Basic dXNlcjpwYXNz", "jwt=" + GOOD, "token=" + FORGED)
    w("raw_cookie_quoted", 0x03, "", 'a=1; jwt="%s"; b=2' % GOOD, "")
    w("raw_cookie_ignored", 0x43, "", "jwt=" + GOOD, "")
    w("raw_query_percent", 0x03, "", "", "x=1&token=" + GOOD.replace(".", "%2e").replace("-", "%2D"))
    w("raw_query_plus", 0x03, "", "", "token=a+b%20c%zz%")
    w("raw_forged", 0x03, "Bearer " + FORGED, "", "")
    w("raw_alg_none", 0x03, "Bearer " + NONE_ALG, "", "")
    w("raw_expired", 0x03, "", "", "token=" + EXPIRED)
    w("raw_five_parts", 0x03, "Bearer a.b.c.d.e", "", "")


# --- config: NAME=value lines ----------------------------------------------------------

def config_seeds():
    def w(name, text):
        write("config", name, text.encode())

    with open(os.path.join(HERE, "..", "template.env")) as f:
        w("template_env", f.read())
    w("minimal", "JWT_SECRET_KEY=change-me-please-0123456789\n")
    w("production", "\n".join([
        "WS_HOST=0.0.0.0", "WS_PORT=8081", "JWT_SECRET_KEY=K7gNU3sdo+OL0wNhqoVWhr3g6s1xYv72ol/pe/Unols=",
        "JWT_USER_CLAIM=user_id", "JWT_ISSUER=https://auth.example.com/", "JWT_AUDIENCE=ws",
        "JWT_LEEWAY=30s", "JWT_COOKIE_NAME=access_token",
        "REDIS_URL=rediss://notify:s3cr3t%40pw@redis.internal:6380/2",
        "REDIS_CHANNEL_PREFIX=prod:user_noti:", "REDIS_PING_INTERVAL=2s",
        "WS_PING_INTERVAL=25s", "WS_PONG_WAIT=1m", "WS_WRITE_WAIT=5s",
        "WS_HANDSHAKE_TIMEOUT=3s", "WS_MAX_MESSAGE_SIZE=4096",
        "WS_MAX_CONNECTIONS=19500", "WS_MAX_CONNECTIONS_PER_USER=10", "WS_SEND_BUFFER=512",
        "WS_ALLOWED_ORIGINS=https://app.example.com, https://admin.example.com",
        "SHUTDOWN_TIMEOUT=1m30s", "LOGGER_LEVEL=warn", "LOGGER_ENCODING=console"]) + "\n")
    w("public_key", "JWT_PUBLIC_KEY_FILE=/etc/ws-notify/jwt.pem\nJWT_ALGORITHM=ES256\n")
    w("redis_fields", "JWT_SECRET_KEY=x\nREDIS_HOST=::1\nREDIS_PORT=6390\nREDIS_USERNAME=app\n"
      "REDIS_PASSWORD=hunter2-hunter2\nREDIS_DB=15\nREDIS_USE_TLS=True\n"
      "REDIS_TLS_CA_FILE=/etc/ssl/private-ca.pem\n")
    w("redis_url_ipv6", "JWT_SECRET_KEY=x\nREDIS_URL=redis://:p@ss@[2001:db8::7]:7000/3?protocol=3\n")
    w("redis_url_bad", "JWT_SECRET_KEY=x\nREDIS_URL=redis://user:hunter2-hunter2@host:80x/db\n")
    w("ipv6_host", "JWT_SECRET_KEY=x\nWS_HOST=[::1]\nWS_PORT=65535\n")
    w("durations_go", "JWT_SECRET_KEY=x\nJWT_LEEWAY=1h15m30.918273645s\nWS_PING_INTERVAL=.5s\n"
      "WS_PONG_WAIT=1.5h\nWS_WRITE_WAIT=12\u00b5s\nWS_HANDSHAKE_TIMEOUT=500ms\n"
      "SHUTDOWN_TIMEOUT=9223372036854775807ns\n")
    w("durations_bad", "JWT_SECRET_KEY=x\nWS_PONG_WAIT=-1s\n2562048h\n1e3s\n1h-5m\n1d\n")
    w("ping_not_below_pong", "JWT_SECRET_KEY=x\nWS_PING_INTERVAL=2m\nWS_PONG_WAIT=1m\n")
    w("bad_numbers", "JWT_SECRET_KEY=x\nWS_MAX_CONNECTIONS=-5\nWS_SEND_BUFFER=1.5\n"
      "WS_MAX_MESSAGE_SIZE=18446744073709551616\n")
    w("bad_port", "JWT_SECRET_KEY=x\nWS_PORT=0\n")
    w("missing_secret", "WS_PORT=8081\n")
    w("bad_algorithm", "JWT_SECRET_KEY=x\nJWT_ALGORITHM=RS256\n")
    w("levels", "JWT_SECRET_KEY=x\nLOGGER_LEVEL=DPANIC\nLOGGER_ENCODING=JSON\nREDIS_USE_TLS=maybe\n")
    w("bad_prefix", "JWT_SECRET_KEY=x\nREDIS_CHANNEL_PREFIX=user_noti:*\n")
    w("huge_leeway", "JWT_SECRET_KEY=x\nJWT_LEEWAY=2562047h\n")
    w("empty_user_claim_is_default", "JWT_SECRET_KEY=x\nJWT_USER_CLAIM=\n")


# --- pubsub_frames: byte 0 = chunk seed, then what Redis sends -------------------------

def resp_bulk(b):
    if isinstance(b, str):
        b = b.encode()
    return b"$%d\r\n%s\r\n" % (len(b), b)


def resp_array(*items, kind=b"*"):
    return kind + b"%d\r\n" % len(items) + b"".join(
        i if isinstance(i, bytes) and i[:1] in b":$*>%_" else resp_bulk(i) for i in items)


def pubsub_frames_seeds():
    def w(name, data, seed=0):
        write("pubsub_frames", name, bytes([seed]) + data)

    msg = resp_array("message", "user_noti:42", '{"type":"t","payload":1}')
    pmsg = resp_array("pmessage", "user_noti:*", "user_noti:42", '{"type":"t"}')
    w("auth_ok_psubscribe_pong_pmessage",
      b"+OK\r\n" + resp_array("psubscribe", "user_noti:*", b":1\r\n")
      + resp_array("pong", "") + pmsg * 3, seed=7)
    w("subscribe_batch_then_messages",
      b"".join(resp_array("subscribe", "user_noti:u%d" % i, b":%d\r\n" % (i + 1))
               for i in range(5)) + msg * 2, seed=3)
    w("unsubscribe_all", resp_array("unsubscribe", "user_noti:u1", b":1\r\n")
      + resp_array("unsubscribe", b"$-1\r\n", b":0\r\n") + b"+PONG\r\n")
    w("sharded", resp_array("ssubscribe", "{u}1", b":1\r\n")
      + resp_array("smessage", "{u}1", "x", kind=b">")
      + resp_array("sunsubscribe", "{u}1", b":0\r\n"), seed=1)
    w("binary_payload", resp_array("message", "user_noti:b", b"\r\n\xff\x00$3\r\n"), seed=9)
    w("errors", b"-WRONGPASS invalid username-password pair or user is disabled.\r\n"
      b"-NOAUTH Authentication required.\r\n-NOPERM this user has no permissions\r\n"
      b"!11\r\nERR blob xx\r\n")
    w("resp3_hello_map", b"%3\r\n+server\r\n$5\r\nredis\r\n+proto\r\n:3\r\n"
      b"+modules\r\n*1\r\n%1\r\n#t\r\n,1.5\r\n_\r\n(123\r\n=7\r\ntxt:abc\r\n~1\r\n:1\r\n", seed=5)
    w("integers", b":0\r\n:-9223372036854775808\r\n:9223372036854775807\r\n:+1\r\n")
    w("integer_overflow", b":9223372036854775808\r\n")
    w("nested_too_deep", b"*1\r\n" * 9 + b":1\r\n")
    w("bulk_too_large", b"$536870913\r\n")
    w("bulk_without_crlf", b"$3\r\nabcd\r\n")
    w("cr_without_lf", b"+OK\rX")
    w("unknown_type", b"+OK\r\n?\r\n")
    w("attribute", b"|1\r\n+a\r\n+b\r\n+OK\r\n")
    w("unfinished_bulk", msg + b"*3\r\n$7\r\nmessage\r\n$3\r\nabc\r\n$100\r\npartial", seed=2)
    w("null_array_and_bulk", b"*-1\r\n$-1\r\n*0\r\n")


def main():
    handshake_seeds()
    frames_seeds()
    redis_message_seeds()
    token_seeds()
    config_seeds()
    pubsub_frames_seeds()


if __name__ == "__main__":
    main()
