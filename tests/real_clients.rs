//! Clients nobody on this team wrote (issue 6): headless Chromium running the
//! README's browser client, the `websockets` library from PyPI, and the `ws`
//! package from npm, each against a real redis-server and the real gateway.
//!
//! Each test skips, saying why, only when its runtime (chromium, python3 with
//! venv, node with npm) is absent; with `WS_NOTIFY_REQUIRE_CLIENTS=1` (set by
//! `.ci/run`, which installs them) a missing runtime fails instead. The
//! Python virtualenv and the npm packages are installed once into
//! `target/tmp/real-clients/` and reused while their pinned versions match.

mod common;

use std::fs;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::procs::{self, Proc};
use common::*;
use serde_json::{Value, json};
use tungstenite::Message;

/// tests/clients: the page, the scripts and the pinned dependency lists.
const CLIENTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients");
/// Installing packages (pip, npm) may take this long on a cold cache.
const INSTALL_TIMEOUT: Duration = Duration::from_secs(300);
/// Chromium's first start in a fresh profile takes a few seconds.
const BROWSER_START: Duration = Duration::from_secs(30);

fn cache_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("real-clients")
}

/// Reports a missing runtime: a printed skip, or a failure when CI asks for
/// every client to run.
fn runtime_absent(test: &str, why: &str) {
    if std::env::var("WS_NOTIFY_REQUIRE_CLIENTS").is_ok_and(|v| v == "1") {
        panic!("{test}: {why} (WS_NOTIFY_REQUIRE_CLIENTS=1: .ci/run should have installed it)");
    }
    eprintln!("SKIPPED {test}: {why}");
}

/// Whether `program args...` runs and exits 0.
fn command_works(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs an install step; fails the test with its output if it fails.
#[track_caller]
fn install_step(what: &str, cmd: Command) {
    let out = procs::run(what, cmd, INSTALL_TIMEOUT);
    assert_eq!(
        out.code,
        Some(0),
        "{what} failed:\nstdout:\n{}\nstderr:\n{}",
        out.stdout,
        out.stderr
    );
}

/// Holds an exclusive `flock` on `path` (created if needed) until dropped, so
/// that two test processes do not build the same cache at once.
struct FileLock {
    _file: fs::File,
}

impl FileLock {
    fn acquire(path: &Path) -> FileLock {
        use std::os::fd::AsRawFd;
        fs::create_dir_all(path.parent().expect("lock file has a parent")).expect("mkdir cache");
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        // SAFETY: flock(2) on a descriptor we own for the lifetime of `file`.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(
            rc,
            0,
            "flock {}: {}",
            path.display(),
            io::Error::last_os_error()
        );
        FileLock { _file: file }
    }
}

/// A cache directory built by `build` unless its `.ready` marker already
/// holds `fingerprint` (the pinned versions and the runtime's version).
fn cached_dir(name: &str, fingerprint: &str, build: impl FnOnce(&Path)) -> PathBuf {
    let dir = cache_dir().join(name);
    let _lock = FileLock::acquire(&cache_dir().join(format!("{name}.lock")));
    let marker = dir.join(".ready");
    if fs::read_to_string(&marker).is_ok_and(|m| m == fingerprint) {
        return dir;
    }
    if dir.exists() {
        fs::remove_dir_all(&dir).unwrap_or_else(|e| panic!("remove {}: {e}", dir.display()));
    }
    build(&dir);
    fs::write(&marker, fingerprint).expect("write .ready marker");
    dir
}

fn version_of(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| {
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        })
        .unwrap_or_default()
}

#[track_caller]
fn json_line(line: &str) -> Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}"))
}

// ---------------------------------------------------------------------------
// Python: websockets (PyPI) in a virtualenv
// ---------------------------------------------------------------------------

/// The virtualenv's python with `websockets` installed, or `None` (skip).
fn python(test: &str) -> Option<PathBuf> {
    if !command_works("python3", &["-c", "import venv, ensurepip"]) {
        runtime_absent(
            test,
            "python3 with the venv module (Debian: python3-venv) not found",
        );
        return None;
    }
    static VENV: OnceLock<PathBuf> = OnceLock::new();
    let venv = VENV.get_or_init(|| {
        let requirements = Path::new(CLIENTS).join("python/requirements.txt");
        let pinned = fs::read_to_string(&requirements).expect("read requirements.txt");
        let fingerprint = format!("{}\n{pinned}", version_of("python3", &["--version"]));
        cached_dir("python-venv", &fingerprint, |dir| {
            let mut venv = Command::new("python3");
            venv.args(["-m", "venv"]).arg(dir);
            install_step("python3 -m venv", venv);
            let mut pip = Command::new(dir.join("bin/python"));
            pip.args([
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--no-input",
            ])
            .args(["-q", "-r"])
            .arg(&requirements);
            install_step("pip install -r tests/clients/python/requirements.txt", pip);
        })
    });
    Some(venv.join("bin/python"))
}

/// `<program> tests/clients/<script> ws://127.0.0.1:<port>/ws <token>`.
fn client_command(
    program: impl AsRef<std::ffi::OsStr>,
    script: &str,
    gw: &Gateway,
    token: &str,
) -> Command {
    let mut cmd = Command::new(program);
    cmd.arg(Path::new(CLIENTS).join(script))
        .arg(format!("ws://127.0.0.1:{}/ws", gw.port))
        .arg(token);
    cmd
}

/// Reads the client's line for the gateway's `connected` message and waits
/// until the gateway counts the connection.
#[track_caller]
fn expect_connected_line(client: &mut Proc, gw: &Gateway, user: &str) {
    let line = json_line(&client.expect_line(PROMPT));
    assert_eq!(line["event"], "message", "{line}");
    assert_message(&line["data"], "connected");
    assert_eq!(line["data"]["payload"]["user_id"], user, "{line}");
    gw.wait_active_connections(1);
}

/// Reads the client's line for a message of type `ty`; returns its payload.
#[track_caller]
fn expect_message_line(client: &mut Proc, ty: &str) -> Value {
    let line = json_line(&client.expect_line(PROMPT));
    assert_eq!(line["event"], "message", "{line}");
    assert_message(&line["data"], ty);
    line["data"]["payload"].clone()
}

fn python_client(python: &Path, gw: &Gateway, token: &str) -> Proc {
    let mut cmd = client_command(python, "python/client.py", gw, token);
    cmd.env("PYTHONUNBUFFERED", "1");
    Proc::spawn("python websockets client", cmd)
}

#[test]
fn python_websockets_receives_a_published_message() {
    let Some(python) = python("python_websockets_receives_a_published_message") else {
        return;
    };
    let (redis, gw) = setup(&[]);
    let mut client = python_client(&python, &gw, &gw.token("pia"));

    let open = json_line(&client.expect_line(PROMPT));
    assert_eq!(open["event"], "open", "{open}");
    // No extension or subprotocol was negotiated (websockets offers
    // permessage-deflate by default; the server declines it).
    assert_eq!(open["extensions"], json!([]), "{open}");
    assert_eq!(open["subprotocol"], Value::Null, "{open}");
    expect_connected_line(&mut client, &gw, "pia");

    let published =
        r#"{"type":"invoice_paid","payload":{"invoice":"INV-7","amount":120.5,"tags":["a","b"]}}"#;
    assert_eq!(redis.notify("pia", published), 1);
    assert_eq!(
        expect_message_line(&mut client, "invoice_paid"),
        json!({"invoice": "INV-7", "amount": 120.5, "tags": ["a", "b"]})
    );
}

#[test]
fn python_websockets_sees_close_4001_on_token_expiry() {
    let Some(python) = python("python_websockets_sees_close_4001_on_token_expiry") else {
        return;
    };
    let (_redis, gw) = setup(&[]);
    let short = token(&gw.secret, "quinn", 2);
    let mut client = python_client(&python, &gw, &short);
    assert_eq!(json_line(&client.expect_line(PROMPT))["event"], "open");
    expect_connected_line(&mut client, &gw, "quinn");
    // The token expires within WS_TOKEN_EXPIRY_NOTICE (60 s): warned at once.
    expect_message_line(&mut client, "token_expiring");
    let close = json_line(&client.expect_line(secs(30)));
    assert_eq!(
        close,
        json!({"event": "close", "code": 4001, "reason": "token expired"})
    );
    assert_eq!(client.expect_exit(PROMPT), Some(0), "{}", client.stderr());
    gw.wait_active_connections(0);
    gw.wait_metric_at_least(
        r#"ws_notify_disconnects_total{reason="token_expired"}"#,
        1.0,
    );
}

// ---------------------------------------------------------------------------
// Node.js: ws (npm)
// ---------------------------------------------------------------------------

/// The `node_modules` folder with `ws` installed from the committed
/// package-lock.json, or `None` (skip).
fn node_modules(test: &str) -> Option<PathBuf> {
    if !command_works("node", &["--version"]) || !command_works("npm", &["--version"]) {
        runtime_absent(test, "node and npm not found (Debian: nodejs, npm)");
        return None;
    }
    static MODULES: OnceLock<PathBuf> = OnceLock::new();
    let dir = MODULES.get_or_init(|| {
        let source = Path::new(CLIENTS).join("node");
        let package = fs::read_to_string(source.join("package.json")).expect("package.json");
        let lock = fs::read_to_string(source.join("package-lock.json")).expect("lock");
        let fingerprint = format!("{}\n{package}\n{lock}", version_of("node", &["--version"]));
        cached_dir("node", &fingerprint, |dir| {
            fs::create_dir_all(dir).expect("mkdir node cache");
            for file in ["package.json", "package-lock.json"] {
                fs::copy(source.join(file), dir.join(file)).expect("copy package files");
            }
            let mut npm = Command::new("npm");
            npm.args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
                .current_dir(dir);
            install_step("npm ci (tests/clients/node)", npm);
        })
    });
    Some(dir.join("node_modules"))
}

fn node_client(modules: &Path, gw: &Gateway, token: &str, deflate: bool) -> Proc {
    let mut cmd = client_command("node", "node/client.js", gw, token);
    cmd.env("NODE_PATH", modules);
    if deflate {
        cmd.arg("deflate");
    }
    Proc::spawn("node ws client", cmd)
}

#[test]
fn node_ws_receives_a_published_message() {
    let Some(modules) = node_modules("node_ws_receives_a_published_message") else {
        return;
    };
    let (redis, gw) = setup(&[]);
    let mut client = node_client(&modules, &gw, &gw.token("rosa"), false);
    let open = json_line(&client.expect_line(PROMPT));
    assert_eq!(
        open,
        json!({"event": "open", "extensions": "", "offered": null, "response_extensions": null})
    );
    expect_connected_line(&mut client, &gw, "rosa");

    assert_eq!(
        redis.notify("rosa", r#"{"type":"chat","payload":"héllo ✓"}"#),
        1
    );
    assert_eq!(expect_message_line(&mut client, "chat"), "héllo ✓");
}

#[test]
fn node_ws_permessage_deflate_offer_is_declined() {
    let Some(modules) = node_modules("node_ws_permessage_deflate_offer_is_declined") else {
        return;
    };
    let (redis, gw) = setup(&[]);
    let mut client = node_client(&modules, &gw, &gw.token("sam"), true);
    let open = json_line(&client.expect_line(PROMPT));
    assert_eq!(open["event"], "open", "{open}");
    let offered = open["offered"].as_str().unwrap_or_default();
    assert!(
        offered.contains("permessage-deflate"),
        "the client did not offer compression: {open}"
    );
    // Declined: the 101 names no extension and ws runs without one.
    assert_eq!(open["response_extensions"], Value::Null, "{open}");
    assert_eq!(open["extensions"], "", "{open}");

    expect_connected_line(&mut client, &gw, "sam");
    // A large, very compressible message still arrives intact, uncompressed.
    let text = "notification ".repeat(400);
    let published = json!({"type": "digest", "payload": {"text": text}}).to_string();
    assert_eq!(redis.notify("sam", &published), 1);
    assert_eq!(expect_message_line(&mut client, "digest")["text"], text);
}

// ---------------------------------------------------------------------------
// Browser: headless Chromium, driven over the DevTools protocol
// ---------------------------------------------------------------------------

/// Chromium's executable: `$WS_NOTIFY_CHROMIUM`, else the first of the usual
/// names on PATH.
fn chromium(test: &str) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("WS_NOTIFY_CHROMIUM") {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in [
        "chromium",
        "chromium-browser",
        "google-chrome",
        "google-chrome-stable",
    ] {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    runtime_absent(test, "no chromium on PATH (Debian: chromium)");
    None
}

/// Serves tests/clients/browser/ over HTTP on a free port until dropped, so
/// that the page has a real `http://127.0.0.1:<port>` origin.
struct PageServer {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl PageServer {
    fn start() -> PageServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind page server");
        let port = listener.local_addr().expect("local_addr").port();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            for stream in listener.incoming() {
                if flag.load(Ordering::SeqCst) {
                    return;
                }
                if let Ok(stream) = stream {
                    // A failed page request shows up as a failed test.
                    let _ = serve_file(stream);
                }
            }
        });
        PageServer {
            port,
            stop,
            thread: Some(thread),
        }
    }

    fn origin(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for PageServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop so that it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve_file(mut stream: TcpStream) -> io::Result<()> {
    stream.set_read_timeout(Some(PROMPT))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 2048];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16384 {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head);
    let path = head.split_whitespace().nth(1).unwrap_or("/");
    let path = path.split(['?', '#']).next().unwrap_or("/");
    let (status, content_type, body) = match path {
        "/page.html" => (
            "200 OK",
            "text/html; charset=utf-8",
            fs::read(Path::new(CLIENTS).join("browser/page.html"))?,
        ),
        "/notify-client.js" => (
            "200 OK",
            "text/javascript; charset=utf-8",
            fs::read(Path::new(CLIENTS).join("browser/notify-client.js"))?,
        ),
        _ => ("404 Not Found", "text/plain", b"not found".to_vec()),
    };
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    stream.write_all(&body)?;
    stream.flush()
}

/// A headless Chromium with a fresh profile, in its own process group
/// (killed whole on drop), and a DevTools protocol connection to it.
struct Browser {
    process: Proc,
    profile: PathBuf,
    cdp: tungstenite::WebSocket<TcpStream>,
    next_id: u64,
}

/// One tab, attached with a flat session.
struct Tab {
    target_id: String,
    session_id: String,
}

impl Browser {
    fn launch(exe: &Path) -> Browser {
        let profile = cache_dir().join(format!("chromium-profile-{}", random_hex(2)));
        fs::create_dir_all(&profile).expect("mkdir profile");
        let mut cmd = Command::new(exe);
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--remote-debugging-port=0",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("about:blank")
        .process_group(0);
        let mut process = Proc::spawn("chromium", cmd);

        // With port 0 Chromium picks a port and writes it, with the browser
        // endpoint's path, to DevToolsActivePort in the profile.
        let active = profile.join("DevToolsActivePort");
        let deadline = Instant::now() + BROWSER_START;
        let (port, path) = loop {
            if let Ok(text) = fs::read_to_string(&active) {
                let mut lines = text.lines();
                if let (Some(port), Some(path)) = (lines.next(), lines.next())
                    && let Ok(port) = port.trim().parse::<u16>()
                {
                    break (port, path.trim().to_string());
                }
            }
            if let Some(status) = process.wait(Duration::ZERO) {
                panic!(
                    "chromium exited ({status}) before DevTools was up:\n{}",
                    process.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "chromium did not write DevToolsActivePort within {BROWSER_START:?}:\n{}",
                process.stderr()
            );
            thread::sleep(ms(50));
        };
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to DevTools");
        stream.set_read_timeout(Some(PROMPT)).expect("timeout");
        let url = format!("ws://127.0.0.1:{port}{path}");
        let (cdp, _) = tungstenite::client::client(url.as_str(), stream)
            .unwrap_or_else(|e| panic!("DevTools WebSocket handshake: {e}"));
        cdp.get_ref()
            .set_read_timeout(Some(ms(100)))
            .expect("timeout");
        Browser {
            process,
            profile,
            cdp,
            next_id: 1,
        }
    }

    /// One DevTools command; returns its `result`, skipping events.
    #[track_caller]
    fn call(&mut self, method: &str, params: Value, session: Option<&str>) -> Value {
        self.try_call(method, params, session)
            .unwrap_or_else(|error| panic!("DevTools {method} failed: {error}"))
    }

    /// One DevTools command: `Ok(result)` or `Err(error)` as the browser
    /// answered; fails the test on a broken connection or no answer.
    #[track_caller]
    fn try_call(
        &mut self,
        method: &str,
        params: Value,
        session: Option<&str>,
    ) -> Result<Value, Value> {
        let id = self.next_id;
        self.next_id += 1;
        let mut command = json!({"id": id, "method": method, "params": params});
        if let Some(session) = session {
            command["sessionId"] = json!(session);
        }
        self.cdp
            .send(Message::text(command.to_string()))
            .unwrap_or_else(|e| panic!("DevTools send {method}: {e}"));
        let deadline = Instant::now() + secs(15);
        loop {
            match self.cdp.read() {
                Ok(Message::Text(text)) => {
                    let reply: Value = serde_json::from_str(text.as_str()).expect("DevTools JSON");
                    if reply["id"] == id {
                        if let Some(error) = reply.get("error") {
                            return Err(error.clone());
                        }
                        return Ok(reply["result"].clone());
                    }
                }
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("DevTools read during {method}: {e}"),
            }
            assert!(
                Instant::now() < deadline,
                "DevTools {method}: no answer within 15 s"
            );
        }
    }

    fn open(&mut self, url: &str) -> Tab {
        let target = self.call("Target.createTarget", json!({"url": url}), None);
        let target_id = target["targetId"].as_str().expect("targetId").to_string();
        let attached = self.call(
            "Target.attachToTarget",
            json!({"targetId": target_id, "flatten": true}),
            None,
        );
        let session_id = attached["sessionId"]
            .as_str()
            .expect("sessionId")
            .to_string();
        let tab = Tab {
            target_id,
            session_id,
        };
        // createTarget answers before the page has loaded: wait for the
        // page's own script to have run (evaluating during the navigation
        // may fail; that counts as not yet).
        let deadline = Instant::now() + secs(15);
        loop {
            let ready = self.try_call(
                "Runtime.evaluate",
                json!({"expression": "typeof window.client === 'object'", "returnByValue": true}),
                Some(&tab.session_id),
            );
            if ready.is_ok_and(|r| r["result"]["value"] == true) {
                return tab;
            }
            assert!(
                Instant::now() < deadline,
                "the page did not load within 15 s: {url}"
            );
            thread::sleep(ms(50));
        }
    }

    /// Evaluates `expression` in the tab; returns its JSON value.
    #[track_caller]
    fn eval(&mut self, tab: &Tab, expression: &str) -> Value {
        let result = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
            Some(&tab.session_id),
        );
        if let Some(exception) = result.get("exceptionDetails") {
            panic!("{expression} threw: {exception}");
        }
        result["result"]["value"].clone()
    }

    /// Polls `expression` until `pred` holds; false after `timeout`.
    fn try_wait_eval(
        &mut self,
        tab: &Tab,
        timeout: Duration,
        expression: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        while !pred(&self.eval(tab, expression)) {
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(ms(50));
        }
        true
    }

    /// Polls `expression` until `pred` holds; fails after `timeout`.
    #[track_caller]
    fn wait_eval(
        &mut self,
        tab: &Tab,
        timeout: Duration,
        expression: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let value = self.eval(tab, expression);
            if pred(&value) {
                return value;
            }
            if Instant::now() >= deadline {
                let log = self.eval(tab, "document.getElementById('log').textContent");
                panic!("page: {expression} is still {value} after {timeout:?}; page log:\n{log}");
            }
            thread::sleep(ms(50));
        }
    }

    fn close_tab(&mut self, tab: Tab) {
        let closed = self.call(
            "Target.closeTarget",
            json!({"targetId": tab.target_id}),
            None,
        );
        // Older Chromiums answer {"success": true}; newer ones {}.
        assert_ne!(closed["success"], json!(false), "closeTarget: {closed}");
    }

    /// SIGKILL to the whole browser (all its processes).
    fn kill(&mut self) {
        if self.process.wait(Duration::ZERO).is_none() {
            // SAFETY: kill(2) on the process group we created for the browser.
            unsafe { libc::kill(-(self.process.pid() as libc::pid_t), libc::SIGKILL) };
        }
        self.process.kill();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        self.kill();
        // The profile is scratch; a leftover is only disk space under target/.
        let _ = fs::remove_dir_all(&self.profile);
    }
}

fn page_url(pages: &PageServer, gw: &Gateway, tokens: &[&str]) -> String {
    let mut url = format!(
        "{}/page.html#ws=ws://127.0.0.1:{}/ws",
        pages.origin(),
        gw.port
    );
    for token in tokens {
        url.push_str("&token=");
        url.push_str(token);
    }
    url
}

/// Browser, page server and gateway for one browser test. The gateway only
/// accepts the page server's origin, so the browser's real `Origin` header
/// is checked too.
fn browser_setup(exe: &Path) -> (RedisServer, PageServer, Gateway, Browser) {
    let redis = RedisServer::start();
    let pages = PageServer::start();
    let origin = pages.origin();
    let gw = Gateway::start(redis.port, &[("WS_ALLOWED_ORIGINS", origin.as_str())]);
    gw.wait_redis_connected(PROMPT);
    let browser = Browser::launch(exe);
    (redis, pages, gw, browser)
}

#[test]
fn browser_receives_messages_and_closing_the_tab_is_a_client_close() {
    let test = "browser_receives_messages_and_closing_the_tab_is_a_client_close";
    let Some(exe) = chromium(test) else { return };
    let (redis, pages, gw, mut browser) = browser_setup(&exe);
    let tab = browser.open(&page_url(&pages, &gw, &[&gw.token("ivy")]));

    gw.wait_active_connections(1);
    browser.wait_eval(&tab, PROMPT, "window.received.length", |v| *v == 1);
    let connected = browser.eval(&tab, "window.received[0]");
    assert_message(&connected, "connected");
    assert_eq!(connected["payload"]["user_id"], "ivy", "{connected}");

    let published = r#"{"type":"order_shipped","payload":{"order_id":42,"eta":"2026-12-01"}}"#;
    assert_eq!(redis.notify("ivy", published), 1);
    browser.wait_eval(&tab, PROMPT, "window.received.length", |v| *v == 2);
    let msg = browser.eval(&tab, "window.received[1]");
    assert_message(&msg, "order_shipped");
    assert_eq!(msg["payload"], json!({"order_id": 42, "eta": "2026-12-01"}));
    assert_eq!(browser.eval(&tab, "document.title"), "messages:2");
    assert_eq!(browser.eval(&tab, "window.closes.length"), 0);

    // Closing the tab: Chromium sends a close frame as the page unloads; the
    // connection is gone from /health and counted as a client close.
    let client_closed = r#"ws_notify_disconnects_total{reason="client_closed"}"#;
    assert_eq!(gw.metric(client_closed), 0.0);
    browser.close_tab(tab);
    gw.wait_active_connections(0);
    gw.wait_metric_at_least(client_closed, 1.0);
    assert_eq!(
        gw.metric(r#"ws_notify_disconnects_total{reason="connection_lost"}"#),
        0.0
    );
    assert_eq!(gw.unique_users(), 0);
}

#[test]
fn browser_client_refreshes_its_token_in_place_when_warned() {
    let test = "browser_client_refreshes_its_token_in_place_when_warned";
    let Some(exe) = chromium(test) else { return };
    let (redis, pages, gw, mut browser) = browser_setup(&exe);
    // The first token expires in 3 s, inside WS_TOKEN_EXPIRY_NOTICE (60 s):
    // the gateway warns at once and the client sends the next token.
    let short_exp = now_secs() + 3;
    let short = token(&gw.secret, "lou", 3);
    let long = gw.token("lou");
    let tab = browser.open(&page_url(&pages, &gw, &[&short, &long]));

    let refreshed = "window.received.filter(m => m.type === 'refreshed').length";
    browser.wait_eval(&tab, PROMPT, refreshed, |v| *v == 1);
    let types = browser.eval(&tab, "window.received.map(m => m.type)");
    assert_eq!(
        types,
        json!(["connected", "token_expiring", "refreshed"]),
        "{types}"
    );
    assert_eq!(browser.eval(&tab, "window.tokenRequests"), 2);
    // The connection outlives the first token: no 4001 after its exp.
    wait_until(secs(10), "the first token's exp has passed", || {
        now_secs() > short_exp + 1
    });
    assert_eq!(redis.notify("lou", r#"{"type":"still_here"}"#), 1);
    let count = "window.received.filter(m => m.type === 'still_here').length";
    browser.wait_eval(&tab, PROMPT, count, |v| *v == 1);
    assert_eq!(browser.eval(&tab, "window.closes.length"), 0);
    let connected_count = "window.received.filter(m => m.type === 'connected').length";
    assert_eq!(browser.eval(&tab, connected_count), 1);
    assert_eq!(
        gw.metric(r#"ws_notify_disconnects_total{reason="token_expired"}"#),
        0.0
    );
}

#[test]
fn browser_client_reconnects_with_a_new_token_on_4001_and_backs_off_on_other_closes() {
    let test = "browser_client_reconnects_with_a_new_token_on_4001_and_backs_off_on_other_closes";
    let Some(exe) = chromium(test) else { return };
    let (redis, pages, gw, mut browser) = browser_setup(&exe);
    // The first token expires in 2 s. Warned at once, the page's getToken
    // gives the same token again, which the client does not send (a refresh
    // that does not move the expiry is warned about again); the gateway
    // closes with 4001 at exp and the client connects with the third token.
    let short = token(&gw.secret, "jo", 2);
    let long = gw.token("jo");
    let tab = browser.open(&page_url(&pages, &gw, &[&short, &short, &long]));

    let connected_count = "window.received.filter(m => m.type === 'connected').length";
    browser.wait_eval(&tab, PROMPT, connected_count, |v| *v == 1);
    browser.wait_eval(&tab, secs(10), connected_count, |v| *v == 2);
    assert_eq!(
        browser.eval(&tab, "window.closes[0]"),
        json!({"code": 4001, "reason": "token expired", "wasClean": true})
    );
    let first = "window.received.slice(0, 3).map(m => m.type)";
    assert_eq!(
        browser.eval(&tab, first),
        json!(["connected", "token_expiring", "connected"])
    );
    assert_eq!(browser.eval(&tab, "window.tokenRequests"), 3);
    gw.wait_active_connections(1);

    // A frame over WS_MAX_MESSAGE_SIZE: the server closes with 1009 and the
    // client reconnects after a (jittered, short) backoff, asking getToken again.
    browser.eval(&tab, "window.client.send('x'.repeat(2000)); true");
    browser.wait_eval(&tab, PROMPT, connected_count, |v| *v == 3);
    // The server sends close 1009 and then drops the connection at once
    // (RFC 6455 7.1.7, "fail the WebSocket connection") without reading the
    // rest of the oversized frame; the kernel then answers with a reset, which
    // Chromium sometimes sees before the close frame and reports as 1006.
    let code = browser.eval(&tab, "window.closes[1].code");
    assert!(code == 1009 || code == 1006, "close code {code}");
    assert_eq!(browser.eval(&tab, "window.tokenRequests"), 4);
    gw.wait_active_connections(1);

    // One live connection: a message arrives once.
    assert_eq!(redis.notify("jo", r#"{"type":"after_reconnect"}"#), 1);
    let count = "window.received.filter(m => m.type === 'after_reconnect').length";
    browser.wait_eval(&tab, PROMPT, count, |v| *v == 1);
    thread::sleep(ms(200));
    assert_eq!(browser.eval(&tab, count), 1);

    // Killing the browser outright: no close frame, the connection is still
    // noticed and removed.
    let lost = r#"ws_notify_disconnects_total{reason="connection_lost"}"#;
    let before = gw.metric(lost);
    browser.kill();
    gw.wait_active_connections(0);
    gw.wait_metric_at_least(lost, before + 1.0);
}

#[test]
fn browser_client_resumes_across_a_gateway_restart_with_every_message_once() {
    let test = "browser_client_resumes_across_a_gateway_restart_with_every_message_once";
    let Some(exe) = chromium(test) else { return };
    const N: usize = 300;
    let redis = RedisServer::start();
    let pages = PageServer::start();
    let origin = pages.origin();
    let env = [
        ("WS_ALLOWED_ORIGINS", origin.as_str()),
        ("WS_HISTORY_SIZE", "1000"),
    ];
    let mut gw = Gateway::start(redis.port, &env);
    gw.wait_redis_connected(PROMPT);
    wait_function_loaded(&redis);
    let mut browser = Browser::launch(&exe);
    let tab = browser.open(&page_url(&pages, &gw, &[&gw.token("kim")]));
    browser.wait_eval(&tab, PROMPT, "window.received.length", |v| *v == 1);
    let connected = browser.eval(&tab, "window.received[0]");
    assert_message(&connected, "connected");
    assert_eq!(connected["payload"]["position"], "0-0", "{connected}");
    // A plain PUBLISH is delivered live only; an `id` string of its own that
    // is not a stream id is the application's and does not move the resume
    // point (nor break the client's id comparison).
    assert_eq!(redis.notify("kim", r#"{"type":"plain","id":"order-7"}"#), 1);
    browser.wait_eval(&tab, PROMPT, "window.received.length", |v| *v == 2);
    assert_eq!(browser.eval(&tab, "window.received[1].id"), "order-7");

    // A steady publisher through the history function, then an end marker.
    let mut con = redis.connection().expect("redis");
    let published = Arc::new(AtomicUsize::new(0));
    let publisher = {
        let published = Arc::clone(&published);
        thread::spawn(move || {
            let mut ids = Vec::with_capacity(N);
            for n in 0..N {
                ids.push(fcall(
                    &mut con,
                    "kim",
                    &format!(r#"{{"type":"seq","payload":{n}}}"#),
                ));
                published.store(n + 1, Ordering::Release);
                thread::sleep(ms(20));
            }
            fcall(&mut con, "kim", r#"{"type":"end"}"#);
            ids
        })
    };

    // Midway, restart the gateway in place: SIGTERM (the page gets 1001),
    // then a new instance on the same port. Redis keeps the history.
    let seqs = "window.received.filter(m => m.type === 'seq').length";
    browser.wait_eval(&tab, secs(30), seqs, |v| v.as_u64() >= Some(N as u64 / 3));
    gw.signal(libc::SIGTERM);
    assert!(gw.wait_exit(secs(30)).is_some(), "the gateway did not stop");
    let at_restart = published.load(Ordering::Acquire);
    assert!(
        at_restart < N,
        "the publisher had finished before the restart"
    );
    let gw = Gateway::start_on_port(gw.port, redis.port, &gw.secret, &env);

    let ids = publisher.join().expect("publisher");
    let ended = "window.received.some(m => m.type === 'end')";
    browser.wait_eval(&tab, secs(60), ended, |v| *v == true);
    gw.wait_active_connections(1);

    // Every message exactly once, in order, with the ids Redis gave them.
    let got = browser.eval(
        &tab,
        "window.received.filter(m => m.type === 'seq').map(m => [m.id, m.payload])",
    );
    let expected: Vec<Value> = ids
        .iter()
        .enumerate()
        .map(|(n, id)| json!([id, n]))
        .collect();
    let got = got.as_array().expect("an array");
    if *got != expected {
        let at = got
            .iter()
            .zip(&expected)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(expected.len()));
        panic!(
            "the page got {} messages for {N}; first difference at {at}: got {:?}, expected {:?}",
            got.len(),
            got.get(at),
            expected.get(at)
        );
    }
    // The page reconnected after the 1001 and resumed with nothing missing.
    let closes = browser.eval(&tab, "window.closes.map(c => c.code)");
    assert_eq!(closes[0], 1001, "{closes}");
    let connects = browser.eval(
        &tab,
        "window.received.filter(m => m.type === 'connected').map(m => m.payload)",
    );
    let connects = connects.as_array().expect("an array");
    assert!(connects.len() >= 2, "no reconnect: {connects:?}");
    for resumed in &connects[1..] {
        assert_eq!(resumed["recovery"]["complete"], true, "{resumed}");
    }
    assert_eq!(browser.eval(&tab, "window.gaps"), 0);
    eprintln!(
        "restart after {at_restart} of {N} messages; {} resume(s), replayed {}",
        connects.len() - 1,
        connects[1]["recovery"]["count"]
    );
}

/// A gateway with history on and a page for `user` whose client pings every
/// `ping_ms` and gives up on a socket after `pong_ms` without an answer.
fn history_page(
    exe: &Path,
    user: &str,
    ping_ms: u32,
    pong_ms: u32,
) -> (RedisServer, PageServer, Gateway, Browser, Tab) {
    let redis = RedisServer::start();
    let pages = PageServer::start();
    let origin = pages.origin();
    let env = [
        ("WS_ALLOWED_ORIGINS", origin.as_str()),
        ("WS_HISTORY_SIZE", "1000"),
    ];
    let gw = Gateway::start(redis.port, &env);
    gw.wait_redis_connected(PROMPT);
    wait_function_loaded(&redis);
    let mut browser = Browser::launch(exe);
    let url = format!(
        "{}&pingEvery={ping_ms}&pongWait={pong_ms}",
        page_url(&pages, &gw, &[&gw.token(user)])
    );
    let tab = browser.open(&url);
    browser.wait_eval(&tab, PROMPT, "window.received.length", |v| *v == 1);
    (redis, pages, gw, browser, tab)
}

#[test]
fn browser_client_drops_a_silent_socket_and_resumes_when_the_gateway_answers_again() {
    let test = "browser_client_drops_a_silent_socket_and_resumes_when_the_gateway_answers_again";
    let Some(exe) = chromium(test) else { return };
    let (redis, _pages, gw, mut browser, tab) = history_page(&exe, "max", 300, 3000);
    let mut con = redis.connection().expect("redis");
    let first = fcall(&mut con, "max", r#"{"type":"seq","payload":0}"#);
    let seqs = "window.received.filter(m => m.type === 'seq').map(m => m.id)";
    browser.wait_eval(&tab, PROMPT, seqs, |v| *v == json!([first]));
    assert_eq!(browser.eval(&tab, "window.closes.length"), 0);

    // Frozen gateway: the TCP connection stays open, but nothing answers.
    // The client must drop the socket itself.
    gw.signal(libc::SIGSTOP);
    let dropped = browser.try_wait_eval(&tab, secs(20), "window.closes.length", |v| *v == 1);
    let during = fcall(&mut con, "max", r#"{"type":"seq","payload":1}"#);
    gw.signal(libc::SIGCONT);
    assert!(dropped, "the page kept a socket that answered no ping");
    assert_eq!(
        browser.eval(&tab, "window.closes[0]"),
        json!({"code": 1006, "reason": "no pong", "wasClean": false})
    );

    // Thawed: the client's new connection (waiting in the listen queue) is
    // served, resumes after `first` and gets `during`, then live messages.
    let connected_count = "window.received.filter(m => m.type === 'connected').length";
    browser.wait_eval(&tab, PROMPT, connected_count, |v| *v == 2);
    let after = fcall(&mut con, "max", r#"{"type":"seq","payload":2}"#);
    browser.wait_eval(&tab, PROMPT, seqs, |v| {
        v.as_array().is_some_and(|a| a.len() >= 3)
    });
    assert_eq!(browser.eval(&tab, seqs), json!([first, during, after]));
    let resumed = browser.eval(
        &tab,
        "window.received.filter(m => m.type === 'connected')[1]",
    );
    assert_eq!(
        resumed["payload"]["recovery"]["complete"], true,
        "{resumed}"
    );
    assert_eq!(browser.eval(&tab, "window.gaps"), 0);
    gw.wait_active_connections(1);
    // Answered pings keep a live socket: the one drop was the frozen one.
    assert_eq!(browser.eval(&tab, "window.closes.length"), 1);
}

#[test]
fn browser_client_gives_up_after_repeated_refused_upgrades_until_told_to_reconnect() {
    let test = "browser_client_gives_up_after_repeated_refused_upgrades_until_told_to_reconnect";
    let Some(exe) = chromium(test) else { return };
    let (_redis, pages, gw, mut browser) = browser_setup(&exe);
    // Three tokens the gateway refuses (401 on the upgrade, a 1006 before
    // open to the page), then a good one that only reconnect() gets to use.
    let good = gw.token("ned");
    let url = format!(
        "{}&maxFailures=3",
        page_url(&pages, &gw, &["bad", "bad", "bad", &good])
    );
    let tab = browser.open(&url);
    browser.wait_eval(&tab, secs(30), "window.giveUps", |v| *v == 1);
    let refused = r#"ws_notify_connections_rejected_total{reason="invalid_token"}"#;
    assert_eq!(gw.metric(refused), 3.0);
    assert_eq!(browser.eval(&tab, "window.tokenRequests"), 3);
    assert_eq!(
        browser.eval(&tab, "window.closes.map(c => c.code)"),
        json!([1006, 1006, 1006])
    );
    // No further attempt: an absence, so it takes waiting; three times the
    // page's longest backoff (maxDelayMs 1000) would have seen several.
    thread::sleep(secs(3));
    assert_eq!(gw.metric(refused), 3.0);
    assert_eq!(browser.eval(&tab, "window.tokenRequests"), 3);
    assert_eq!(browser.eval(&tab, "window.giveUps"), 1);

    // The application decides to try again (say, after a new sign-in).
    browser.eval(&tab, "window.client.reconnect(); true");
    gw.wait_active_connections(1);
    let connected_count = "window.received.filter(m => m.type === 'connected').length";
    browser.wait_eval(&tab, PROMPT, connected_count, |v| *v == 1);
    assert_eq!(browser.eval(&tab, "window.giveUps"), 1);
}

#[test]
fn browser_client_reconnects_at_once_when_back_online_or_visible() {
    let test = "browser_client_reconnects_at_once_when_back_online_or_visible";
    let Some(exe) = chromium(test) else { return };
    let redis = RedisServer::start();
    let pages = PageServer::start();
    let origin = pages.origin();
    let env = [("WS_ALLOWED_ORIGINS", origin.as_str())];
    let mut gw = Gateway::start(redis.port, &env);
    gw.wait_redis_connected(PROMPT);
    let mut browser = Browser::launch(&exe);
    // A backoff of up to ten minutes: only the wake-up can reconnect in time.
    let url = format!(
        "{}&minDelayMs=600000&maxDelayMs=600000",
        page_url(&pages, &gw, &[&gw.token("ola")])
    );
    let tab = browser.open(&url);
    let connected_count = "window.received.filter(m => m.type === 'connected').length";
    browser.wait_eval(&tab, PROMPT, connected_count, |v| *v == 1);

    // The events a browser fires when the network comes back and when the
    // user returns to the tab (headless Chromium's tab is always visible).
    for (round, wake) in [
        "window.dispatchEvent(new Event('online')); true",
        "document.dispatchEvent(new Event('visibilitychange')); true",
    ]
    .into_iter()
    .enumerate()
    {
        gw.signal(libc::SIGTERM);
        assert!(gw.wait_exit(secs(30)).is_some(), "the gateway did not stop");
        let closes = round as u64 + 1;
        browser.wait_eval(&tab, PROMPT, "window.closes.length", |v| *v == closes);
        gw = Gateway::start_on_port(gw.port, redis.port, &gw.secret, &env);
        gw.wait_redis_connected(PROMPT);
        browser.eval(&tab, wake);
        browser.wait_eval(&tab, PROMPT, connected_count, |v| *v == closes + 1);
        gw.wait_active_connections(1);
    }
    assert_eq!(redis.notify("ola", r#"{"type":"back"}"#), 1);
    let count = "window.received.filter(m => m.type === 'back').length";
    browser.wait_eval(&tab, PROMPT, count, |v| *v == 1);
}

#[test]
fn readme_shows_the_tested_browser_client() {
    // The README's browser snippet is the file the browser tests run.
    let snippet = fs::read_to_string(Path::new(CLIENTS).join("browser/notify-client.js"))
        .expect("read notify-client.js");
    let readme = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README");
    assert!(
        readme.contains(snippet.trim_end()),
        "README.md must contain tests/clients/browser/notify-client.js verbatim"
    );
}
