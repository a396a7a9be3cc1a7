//! Tokens and upgrade requests, built once per user before any connection.
//!
//! Every connection of a user sends the same bytes, so the request is encoded
//! once (HS256, `exp` one hour ahead) and shared read-only by the client
//! threads.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};

use crate::args::Options;
use crate::frame::WS_KEY;

/// User id of user number `user`.
pub fn user_id(user: usize) -> String {
    format!("bench-{user}")
}

/// One complete HTTP upgrade request per user, indexed by user number.
pub fn upgrade_requests(options: &Options) -> Result<Vec<Box<[u8]>>, jsonwebtoken::errors::Error> {
    let key = EncodingKey::from_secret(options.secret.as_bytes());
    let header = Header::new(Algorithm::HS256);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    (0..options.users)
        .map(|user| {
            let mut claims = serde_json::Map::new();
            claims.insert(options.user_claim.clone(), user_id(user).into());
            claims.insert("iat".into(), now.into());
            claims.insert("exp".into(), (now + 3600).into());
            let token = jsonwebtoken::encode(&header, &claims, &key)?;
            // The token is base64url and dots: safe in a query string as is.
            let request = format!(
                "GET /ws?token={token} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n\
                 Connection: Upgrade\r\nSec-WebSocket-Key: {WS_KEY}\r\n\
                 Sec-WebSocket-Version: 13\r\n\r\n",
                host = options.host,
            );
            Ok(request.into_bytes().into_boxed_slice())
        })
        .collect()
}
