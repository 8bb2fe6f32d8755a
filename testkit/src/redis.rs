//! A real `redis-server` for tests: started on a free port in a temporary directory, with
//! persistence off (`--save "" --appendonly no`), killed on drop.
//!
//! Use it from a test file with `tandem_testkit::redis::RedisServer::start()`.
//!
//! `start` answers `None` (and prints a loud `SKIPPED` line) when `redis-server` is not
//! installed, so a laptop without Redis still runs the rest of the suite. CI sets
//! `TANDEM_REQUIRE_REDIS=1`, which turns a missing binary into a panic. `TANDEM_REDIS_SERVER`
//! names the binary if it is not `redis-server` on `PATH`.
//!
//! `stop`, `restart`, `pause` and `resume` simulate Redis going away (refused connections),
//! coming back (on the same port, with no data), and hanging (SIGSTOP: connections accepted
//! by the kernel, never answered).

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How long a starting server has to answer PING.
const START_TIMEOUT: Duration = Duration::from_secs(10);

pub struct RedisServer {
    binary: PathBuf,
    dir: TempDir,
    port: u16,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a server, or answers `None` if `redis-server` is absent (panics instead when
    /// `TANDEM_REQUIRE_REDIS=1`). Panics if the binary exists but the server will not start.
    pub fn start() -> Option<Self> {
        let binary = PathBuf::from(
            std::env::var("TANDEM_REDIS_SERVER").unwrap_or_else(|_| "redis-server".to_owned()),
        );
        match Command::new(&binary).arg("--version").output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => panic!("{} --version failed: {:?}", binary.display(), out.status),
            Err(e) if e.kind() == ErrorKind::NotFound => {
                if std::env::var("TANDEM_REQUIRE_REDIS").as_deref() == Ok("1") {
                    panic!(
                        "TANDEM_REQUIRE_REDIS=1 but {} was not found: install Redis",
                        binary.display()
                    );
                }
                // Straight to the process's stderr: libtest captures `eprintln!`, and this
                // must be seen.
                let _ = writeln!(
                    std::io::stderr(),
                    "\n********************************************************************\n\
                     SKIPPED: redis-server not found ({}); Redis tests did not run.\n\
                     Install Redis, or set TANDEM_REDIS_SERVER to its path.\n\
                     ********************************************************************\n",
                    binary.display()
                );
                return None;
            }
            Err(e) => panic!("cannot run {}: {e}", binary.display()),
        }
        let dir = tempfile::tempdir().expect("temp dir for redis");
        // The port is free when asked; another process could take it before redis binds, so
        // try a few.
        for _ in 0..5 {
            let port = free_port();
            if let Ok(child) = spawn(&binary, &dir, port) {
                let child = Some(child);
                return Some(Self {
                    binary,
                    dir,
                    port,
                    child,
                });
            }
        }
        panic!("redis-server would not start on a free port (5 tries)");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Kills the server (SIGKILL) and waits for it: connections are refused from now on.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGKILL ends a paused (SIGSTOPped) server too.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the server if it runs and starts a new one on the same port. Persistence is
    /// off, so the new server is empty.
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match spawn(&self.binary, &self.dir, self.port) {
                Ok(child) => {
                    self.child = Some(child);
                    return;
                }
                Err(e) if Instant::now() > deadline => panic!("redis restart failed: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// `FLUSHALL`: every key of every database is gone; the server keeps running.
    pub fn flushall(&self) {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).expect("connect to redis");
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        stream.write_all(b"FLUSHALL\r\n").expect("send FLUSHALL");
        let mut buf = [0u8; 5];
        stream.read_exact(&mut buf).expect("FLUSHALL reply");
        assert_eq!(&buf, b"+OK\r\n", "FLUSHALL answered");
    }

    /// Freezes the server (SIGSTOP): it keeps its socket but answers nothing.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Undoes [`pause`](Self::pause).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let child = self.child.as_ref().expect("redis is not running");
        let status = Command::new("kill")
            .args([sig, &child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {sig} failed");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts `redis-server` on `port` and waits until it answers PING.
fn spawn(binary: &Path, dir: &TempDir, port: u16) -> Result<Child, String> {
    let mut child = Command::new(binary)
        .args(["--port", &port.to_string()])
        .args(["--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("spawn {}: {e}", binary.display()))?;
    let deadline = Instant::now() + START_TIMEOUT;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("redis-server exited early: {status}"));
        }
        // The server answering must be this child: another test's redis-server may hold the
        // port (taken between `free_port` and the bind), and then this one exits.
        if ping(port) && server_pid(port) == Some(child.id()) {
            return Ok(child);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    Err(format!("redis-server on port {port} never answered PING"))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// Whether a Redis on `port` answers `PING` with `+PONG`.
/// The `process_id` that the Redis server on `port` reports (`INFO server`).
fn server_pid(port: u16) -> Option<u32> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    stream.write_all(b"INFO server\r\n").ok()?;
    let mut text = Vec::new();
    let mut buf = [0u8; 4096];
    // A bulk string: `$LEN\r\n` then the text; read until the process_id line is in.
    while !String::from_utf8_lossy(&text).contains("process_id:") || !text.ends_with(b"\r\n") {
        let n = stream.read(&mut buf).ok()?;
        if n == 0 || text.len() > 64 << 10 {
            break;
        }
        text.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&text)
        .lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|v| v.trim().parse().ok())
}

fn ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    stream.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}
