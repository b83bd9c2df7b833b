//! The service under test: a real `order-service serve` process, its log and its answers.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::eventually;

/// A running `order-service serve` process.
pub struct Service {
    child: Child,
    pub addr: String,
    pub logs: Arc<Mutex<Vec<String>>>,
    /// Held, the service's stderr is no longer read (see `stop_reading_logs`).
    log_reading: Arc<tokio::sync::Mutex<()>>,
    pub client: reqwest::Client,
}

impl Service {
    pub fn spawn(env: Vec<(String, String)>) -> Self {
        Self::spawn_command(Command::new(env!("CARGO_BIN_EXE_order-service")), env)
    }

    /// Started as `nohup order-service serve` starts it: hang-ups ignored.
    pub fn spawn_under_nohup(env: Vec<(String, String)>) -> Self {
        let mut nohup = Command::new("nohup");
        nohup.arg(env!("CARGO_BIN_EXE_order-service"));
        Self::spawn_command(nohup, env)
    }

    /// Started under an open-files limit: `soft`, which it may raise up to `hard`.
    pub fn spawn_with_open_files(env: Vec<(String, String)>, soft: u64, hard: u64) -> Self {
        let mut prlimit = Command::new("prlimit");
        prlimit
            .arg(format!("--nofile={soft}:{hard}"))
            .arg(env!("CARGO_BIN_EXE_order-service"));
        Self::spawn_command(prlimit, env)
    }

    /// A connection following the live feed of stored orders, left unread: it
    /// holds one of the service's connections until dropped.
    pub async fn hold_feed(&self) -> tokio::net::TcpStream {
        let mut feed = tokio::net::TcpStream::connect(&self.addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(
            &mut feed,
            b"GET /api/orders/stream HTTP/1.1\r\nHost: test\r\n\r\n",
        )
        .await
        .unwrap();
        feed
    }

    /// Stops reading the service's stderr until the guard is dropped: once
    /// the pipe is full, every write of a log line would wait.
    pub async fn stop_reading_logs(&self) -> tokio::sync::OwnedMutexGuard<()> {
        self.log_reading.clone().lock_owned().await
    }

    /// The soft open-files limit the process runs under.
    pub fn open_files_limit(&self) -> u64 {
        self.proc_number("limits", "Max open files")
    }

    /// The first number on the line of `/proc/PID/{file}` that starts with `key`.
    fn proc_number(&self, file: &str, key: &str) -> u64 {
        let text = std::fs::read_to_string(format!("/proc/{}/{file}", self.child.id())).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("{key} in /proc/PID/{file}"))
    }

    fn spawn_command(mut command: Command, env: Vec<(String, String)>) -> Self {
        let mut child = command
            .arg("serve")
            .env_clear()
            .envs(env)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start order-service");
        let stderr = child.stderr.take().unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let sink = logs.clone();
        let log_reading = Arc::new(tokio::sync::Mutex::new(()));
        let gate = log_reading.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                drop(gate.blocking_lock());
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    if let Some(addr) = v.get("addr").and_then(|a| a.as_str()) {
                        let _ = addr_tx.send(addr.to_owned());
                    }
                }
                sink.lock().unwrap().push(line);
            }
        });
        let addr = match addr_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "service did not start; logs:\n{}",
                    logs.lock().unwrap().join("\n")
                );
            }
        };
        Self {
            child,
            addr,
            logs,
            log_reading,
            client: reqwest::Client::new(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .send()
            .await
            .expect("request sent")
    }

    /// Waits until the service has logged `text`.
    pub async fn wait_for_log(&self, text: &str, within: Duration) {
        eventually(
            within,
            || async { self.log_text().contains(text).then_some(()) },
            || format!("not logged within {within:?}: {text}\n{}", self.log_text()),
        )
        .await;
    }

    /// Waits until `/readyz` answers 503 with a problem that names `cause`
    /// and the check `key` reads `value`.
    pub async fn wait_unready(&self, cause: &str, (key, value): (&str, &str)) {
        let unready = || async {
            let r = self.get("/readyz").await;
            if r.status() != 503 {
                return None;
            }
            let body: serde_json::Value = r.json().await.unwrap();
            let named = body["problems"]
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p.as_str().unwrap_or("").contains(cause)));
            (named && body["checks"][key] == value).then_some(())
        };
        eventually(Duration::from_secs(30), unready, || {
            format!("/readyz never named {cause:?}:\n{}", self.log_text())
        })
        .await;
    }

    /// Waits until the service is ready (PostgreSQL up, partitions assigned).
    pub async fn wait_ready(&self) {
        let ready = || async {
            let r = self.client.get(self.url("/readyz")).send().await.ok()?;
            (r.status() == 200).then_some(())
        };
        eventually(Duration::from_secs(60), ready, || {
            format!("service never became ready:\n{}", self.log_text())
        })
        .await;
    }

    /// The `/readyz` body once the cache warm-up is done. Warm-up runs beside
    /// ingest and never holds readiness back, so it may finish after it.
    pub async fn readiness_after_warmup(&self) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready: serde_json::Value = self.get("/readyz").await.json().await.unwrap();
            if ready["warmup"]["done"] == true {
                return ready;
            }
            assert!(Instant::now() < deadline, "warm-up never done: {ready}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until `GET /order/{uid}` answers 200 and returns the body.
    pub async fn wait_for_order(&self, uid: &str, within: Duration) -> serde_json::Value {
        let found = || async {
            let r = self.get(&format!("/order/{uid}")).await;
            if r.status() != 200 {
                return None;
            }
            Some(r.json().await.unwrap())
        };
        eventually(within, found, || {
            format!("order {uid} never appeared:\n{}", self.log_text())
        })
        .await
    }

    /// Waits until no PostgreSQL session is checked out of the pool (ten
    /// seconds at most).
    pub async fn wait_pool_idle(&self) {
        eventually(
            Duration::from_secs(10),
            || async { (self.metric("db_pool_connections_in_use").await == 0.0).then_some(()) },
            || "the pool never went idle".to_owned(),
        )
        .await;
    }

    /// The value of one series; fails if the service does not expose it, so
    /// a renamed metric cannot pass a check for zero.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.get("/metrics").await.text().await.unwrap();
        text.lines()
            .find_map(|line| {
                line.strip_prefix(series)
                    .and_then(|rest| rest.strip_prefix(' '))
            })
            .unwrap_or_else(|| panic!("no series {series} in /metrics:\n{text}"))
            .parse()
            .unwrap()
    }

    /// How many of the process's threads have a name starting with `prefix`.
    pub fn threads_named(&self, prefix: &str) -> usize {
        std::fs::read_dir(format!("/proc/{}/task", self.child.id()))
            .unwrap()
            .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
            .filter(|name| name.starts_with(prefix))
            .count()
    }

    /// Resident memory of the process, from /proc.
    pub fn rss_bytes(&self) -> u64 {
        self.proc_number("status", "VmRSS:") * 1024
    }

    pub fn log_text(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// SIGTERM, and the exit status once it stops.
    pub fn terminate(self) -> std::process::ExitStatus {
        self.stop_with("TERM")
    }

    /// SIGTERM, asserting that it exits 0 within `bound`.
    pub fn terminate_within(self, bound: Duration) {
        let started = Instant::now();
        let status = self.terminate();
        let took = started.elapsed();
        assert!(status.success(), "{status:?}");
        assert!(took < bound, "took {took:?}, bound {bound:?}");
    }

    /// Sends `name` (`TERM`, `HUP`), and the exit status once it stops.
    pub fn stop_with(mut self, name: &str) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status();
        self.child.wait().unwrap()
    }

    /// Sends `name` (`STOP`, `CONT`) to the service's process.
    pub fn signal(&self, name: &str) {
        signal(&self.child, name);
    }

    /// SIGKILL: a crash, no chance to finish anything.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends the signal `name` (`STOP`, `CONT`, …) to `child`.
pub fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success(), "kill -{name} {}", child.id());
}

impl Drop for Service {
    fn drop(&mut self) {
        // Whether it had ended on its own (a crash), before it is killed.
        let ended = self.child.try_wait().ok().flatten();
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A failed test shows what its instances said, whatever it asserted.
        if std::thread::panicking() {
            let logs = self.logs.lock().map(|l| l.join("\n")).unwrap_or_default();
            let ended = ended.map_or("running until the end of the test".to_owned(), |status| {
                format!("ended by itself: {status}")
            });
            eprintln!("--- log of the instance ({ended}) ---\n{logs}");
        }
    }
}
