//! `redis-server` as a child process on a free port, with a connection of its
//! own to PING and PUBLISH.

use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use super::{POLL, free_port, send_signal};

/// A `redis-server` child on a free port, killed on drop.
pub struct RedisServer {
    pub port: u16,
    args: Vec<String>,
    username: Option<String>,
    password: Option<String>,
    child: Option<Child>,
    conn: Mutex<Option<redis::Connection>>,
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_with(&[], None, None)
    }

    /// With `requirepass` (default user) or, with a username, an ACL user that
    /// may do everything.
    pub fn start_with_auth(username: Option<&str>, password: &str) -> Self {
        match username {
            None => Self::start_with(&["--requirepass", password], None, Some(password)),
            Some(user) => {
                // One argument per word: redis-server joins them into one config line.
                let pass = format!(">{password}");
                Self::start_with(
                    &["--user", user, "on", &pass, "~*", "&*", "+@all"],
                    Some(user),
                    Some(password),
                )
            }
        }
    }

    /// Extra `redis-server` arguments; `username`/`password` are what the
    /// harness itself uses to PING and PUBLISH.
    pub fn start_with(args: &[&str], username: Option<&str>, password: Option<&str>) -> Self {
        let mut last_error = String::new();
        for _ in 0..5 {
            let mut server = RedisServer {
                port: free_port(),
                args: args.iter().map(|s| s.to_string()).collect(),
                username: username.map(str::to_string),
                password: password.map(str::to_string),
                child: None,
                conn: Mutex::new(None),
            };
            match server.spawn_and_wait(Duration::from_secs(10)) {
                Ok(()) => return server,
                Err(e) => last_error = e,
            }
        }
        panic!("could not start redis-server: {last_error}");
    }

    fn spawn_and_wait(&mut self, timeout: Duration) -> Result<(), String> {
        let child = Command::new("redis-server")
            .arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawn redis-server (is it installed?): {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + timeout;
        loop {
            if self.ping() {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(format!(
                    "redis-server on port {} exited: {status}",
                    self.port
                ));
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(format!(
                    "redis-server on port {} did not answer PING",
                    self.port
                ));
            }
            thread::sleep(POLL);
        }
    }

    /// `redis://[user:pass@]127.0.0.1:<port>/`
    pub fn url(&self) -> String {
        let auth = match (&self.username, &self.password) {
            (Some(u), Some(p)) => format!("{u}:{p}@"),
            (None, Some(p)) => format!(":{p}@"),
            _ => String::new(),
        };
        format!("redis://{auth}127.0.0.1:{}/", self.port)
    }

    pub fn connection(&self) -> redis::RedisResult<redis::Connection> {
        redis::Client::open(self.url())?.get_connection_with_timeout(Duration::from_secs(1))
    }

    fn ping(&self) -> bool {
        self.connection()
            .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
            .is_ok()
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Sends a signal to redis-server (SIGSTOP/SIGCONT to make it hang).
    pub fn signal(&self, sig: libc::c_int) {
        let child = self.child.as_ref().expect("redis-server is not running");
        send_signal(child.id(), sig);
    }

    /// SIGKILL and reap; the port is free afterwards.
    pub fn kill(&mut self) {
        *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = None;
        if let Some(mut child) = self.child.take() {
            // The child may have exited already; either way we reap it next.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills (if running) and starts again on the same port.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.spawn_and_wait(Duration::from_secs(5)) {
                Ok(()) => return,
                Err(e) if Instant::now() >= deadline => panic!("redis restart failed: {e}"),
                Err(_) => thread::sleep(POLL),
            }
        }
    }

    /// PUBLISH; returns the number of receivers Redis reports.
    pub fn publish(&self, channel: &str, payload: impl AsRef<[u8]>) -> i64 {
        let mut guard = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        for attempt in 0..2 {
            if guard.is_none() {
                *guard = Some(self.connection().expect("connect to redis for PUBLISH"));
            }
            let conn = guard.as_mut().expect("connection just set");
            match redis::cmd("PUBLISH")
                .arg(channel)
                .arg(payload.as_ref())
                .query::<i64>(conn)
            {
                Ok(n) => return n,
                Err(e) if attempt == 0 => {
                    eprintln!("PUBLISH failed ({e}), reconnecting");
                    *guard = None;
                }
                Err(e) => panic!("PUBLISH {channel}: {e}"),
            }
        }
        unreachable!()
    }

    /// Publishes to the default channel of `user`.
    pub fn notify(&self, user: &str, payload: impl AsRef<[u8]>) -> i64 {
        self.publish(&format!("user_noti:{user}"), payload)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until a gateway with history on has loaded the `ws_notify` function
/// library into `redis` (it does so at start and after every reconnect).
pub fn wait_function_loaded(redis: &RedisServer) {
    super::wait_until(super::PROMPT, "the ws_notify library is loaded", || {
        redis
            .connection()
            .and_then(|mut c| {
                redis::cmd("FUNCTION")
                    .arg("LIST")
                    .arg("LIBRARYNAME")
                    .arg("ws_notify")
                    .query::<Vec<redis::Value>>(&mut c)
            })
            .is_ok_and(|libraries| !libraries.is_empty())
    });
}

/// Publishes `message` for `user` through the history function
/// (`FCALL ws_notify_publish`); returns the message's id.
pub fn fcall(con: &mut redis::Connection, user: &str, message: &str) -> String {
    redis::cmd("FCALL")
        .arg("ws_notify_publish")
        .arg(1)
        .arg(format!("user_noti:{user}"))
        .arg(message)
        .query::<String>(con)
        .unwrap_or_else(|e| panic!("FCALL ws_notify_publish {message}: {e}"))
}
