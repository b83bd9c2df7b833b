//! HTTP benchmark, run by `scripts/stack bench http`. With N orders cached
//! (BENCH_HTTP_ORDERS, default 100000): wrk with random keys against
//! `GET /order/{uid}`, and in the same run nginx serving one of the same JSON
//! documents as a static file with the same wrk settings; then latency of both
//! under an open-loop load at half our measured maximum (oha), resident memory
//! against cached bytes, and the warm-up rate from PostgreSQL. Then wrk
//! again with each server pinned to CPU 0 and wrk to CPU 1, so that neither
//! shares its core with the load generator. BENCH_HTTP_PROFILE=FILE also samples where
//! the service spends its time during its wrk run (`perf`, Debian's
//! linux-perf) into FILE and prints the top of the profile.

#[path = "support/process.rs"]
mod process;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use order_service::configuration::Settings;
use order_service::domain::{parse_order, Limits};
use order_service::producer::Generator;
use order_service::store::{Incoming, Store};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::ConnectOptions;

const WRK_ARGS: [&str; 4] = ["-t2", "-c64", "--latency", "--timeout=2s"];
const WRK_SECS: u32 = 10;

fn var(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

struct Wrk {
    requests_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// Runs wrk, on `cpu` alone when given (then with one thread).
fn wrk(url: &str, script: Option<&std::path::Path>, cpu: Option<&str>) -> Wrk {
    let mut cmd = on_cpu("wrk", cpu);
    match cpu {
        Some(_) => cmd.arg("-t1").args(&WRK_ARGS[1..]),
        None => cmd.args(WRK_ARGS),
    };
    cmd.arg(format!("-d{WRK_SECS}s"));
    if let Some(script) = script {
        cmd.arg("-s").arg(script);
    }
    let out = cmd
        .arg(url)
        .output()
        .expect("wrk runs (apt-get install wrk)");
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |prefix: &str| -> f64 {
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with(prefix))
            .unwrap_or_else(|| panic!("{prefix} in {text}"));
        let value = line.trim_start()[prefix.len()..]
            .split_whitespace()
            .next()
            .unwrap();
        parse_ms(value)
    };
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or_else(|| panic!("no rate in {text}"));
    Wrk {
        requests_per_sec: rps,
        p50_ms: field("50%"),
        p99_ms: field("99%"),
    }
}

/// Samples the process `pid` for `secs` (the length of a wrk run started
/// right after) into `file`.
fn profile_for(pid: u32, file: &str, secs: u32) -> (Child, String) {
    let perf = Command::new("perf")
        .args(["record", "-F", "999", "-o", file, "-p", &pid.to_string()])
        .args(["--", "sleep", &secs.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("perf runs (apt-get install linux-perf)");
    (perf, file.to_owned())
}

/// The functions that took the most samples, by shared object.
fn print_profile(mut perf: Child, file: &str) {
    let status = perf.wait().expect("perf record ends");
    assert!(status.success(), "perf record: {status:?}");
    let report = Command::new("perf")
        .args([
            "report",
            "--stdio",
            "--no-children",
            "--percent-limit",
            "0.7",
        ])
        .args(["--sort", "dso,symbol", "-i", file])
        .output()
        .expect("perf report runs");
    println!("  where the service's time went during its wrk run ({file}):");
    for line in String::from_utf8_lossy(&report.stdout)
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        println!("    {line}");
    }
}

/// wrk prints latencies as 812.00us, 1.20ms or 2.01s.
fn parse_ms(value: &str) -> f64 {
    if let Some(v) = value.strip_suffix("us") {
        v.parse::<f64>().unwrap() / 1000.0
    } else if let Some(v) = value.strip_suffix("ms") {
        v.parse().unwrap()
    } else if let Some(v) = value.strip_suffix('s') {
        v.parse::<f64>().unwrap() * 1000.0
    } else {
        value.parse().unwrap()
    }
}

/// CPU time the processes used so far, user and system, in seconds.
fn cpu_seconds(pids: &[u32]) -> (f64, f64) {
    let ticks_per_second = process::ticks_per_second();
    pids.iter().fold((0.0, 0.0), |(user, system), &pid| {
        let (u, s) = process::cpu_ticks(pid);
        (
            user + u as f64 / ticks_per_second,
            system + s as f64 / ticks_per_second,
        )
    })
}

/// `program`, on `cpu` alone when given.
fn on_cpu(program: &str, cpu: Option<&str>) -> Command {
    match cpu {
        Some(cpu) => {
            let mut command = Command::new("taskset");
            command.args(["-c", cpu, program]);
            command
        }
        None => Command::new(program),
    }
}

/// `nginx`'s master and its worker processes.
fn with_children(pid: u32) -> Vec<u32> {
    let children = Command::new("pgrep")
        .args(["-P", &pid.to_string()])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    std::iter::once(pid)
        .chain(children.lines().filter_map(|l| l.trim().parse().ok()))
        .collect()
}

/// A wrk run and the CPU the server's processes spent meanwhile, per request.
fn wrk_with_cpu(
    url: &str,
    script: Option<&std::path::Path>,
    pids: &[u32],
    cpu: Option<&str>,
) -> (Wrk, String) {
    let before = cpu_seconds(pids);
    let run = wrk(url, script, cpu);
    let after = cpu_seconds(pids);
    let requests = run.requests_per_sec * f64::from(WRK_SECS);
    let per_request = |seconds: f64| seconds * 1e6 / requests.max(1.0);
    let (user, system) = (
        per_request(after.0 - before.0),
        per_request(after.1 - before.1),
    );
    let cpu = format!(
        "{:.1} us CPU/request (user {user:.1}, system {system:.1})",
        user + system
    );
    (run, cpu)
}

/// wrk against us (at `ours`: address, request script, process), then
/// against nginx (port, master process), and the ratio; `after_ours` runs
/// between the two.
fn compare(
    (addr, script, pid): (&str, &std::path::Path, u32),
    (port, nginx): (u16, u32),
    cpu: Option<&str>,
    after_ours: impl FnOnce(),
) {
    let (ours, ours_cpu) = wrk_with_cpu(&format!("http://{addr}"), Some(script), &[pid], cpu);
    after_ours();
    let (theirs, theirs_cpu) = wrk_with_cpu(
        &format!("http://127.0.0.1:{port}/order.json"),
        None,
        &with_children(nginx),
        cpu,
    );
    println!(
        "    order-service GET /order/{{random uid}}  {:>9.0} req/s  p50 {:.2} ms  p99 {:.2} ms",
        ours.requests_per_sec, ours.p50_ms, ours.p99_ms
    );
    println!(
        "    nginx static file (same JSON)          {:>9.0} req/s  p50 {:.2} ms  p99 {:.2} ms",
        theirs.requests_per_sec, theirs.p50_ms, theirs.p99_ms
    );
    println!(
        "    ratio order-service / nginx = {:.2}   (target >= 1.0)",
        ours.requests_per_sec / theirs.requests_per_sec
    );
    println!("    server CPU meanwhile: order-service {ours_cpu}; nginx {theirs_cpu}");
}

/// nginx serving `dir`'s files on `port`, tuned as for production (sendfile,
/// tcp_nopush, long keep-alive) with `workers` worker processes, on `cpu`
/// alone when given.
fn start_nginx(dir: &std::path::Path, port: u16, workers: &str, cpu: Option<&str>) -> Child {
    let conf = dir.join(format!("nginx-{port}.conf"));
    std::fs::write(
        &conf,
        format!(
            "worker_processes {workers};\npid {dir}/nginx-{port}.pid;\nerror_log {dir}/error.log;\ndaemon off;\n\
             events {{ worker_connections 1024; }}\n\
             http {{ access_log off; default_type application/json; sendfile on; tcp_nopush on; keepalive_requests 1000000;\n\
             client_body_temp_path {dir}; proxy_temp_path {dir}; fastcgi_temp_path {dir}; uwsgi_temp_path {dir}; scgi_temp_path {dir};\n\
             server {{ listen 127.0.0.1:{port}; root {dir}; }} }}\n",
            dir = dir.display()
        ),
    )
    .unwrap();
    let nginx = on_cpu("nginx", cpu)
        .arg("-c")
        .arg(&conf)
        .spawn()
        .expect("nginx runs (apt-get install nginx-light)");
    std::thread::sleep(Duration::from_millis(500));
    nginx
}

/// SIGTERM, so nginx's master takes its workers down too.
fn stop_nginx(mut nginx: Child) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(nginx.id().to_string())
        .status();
    let _ = nginx.wait();
}

/// Starts `serve`; with `cpu`, on that CPU alone with one HTTP worker.
fn start_service(
    db_url: &str,
    warmup: u64,
    cpu: Option<&str>,
) -> (Child, String, std::sync::mpsc::Receiver<u64>) {
    let exe = env!("CARGO_BIN_EXE_order-service");
    let mut child = on_cpu(exe, cpu)
        .arg("serve")
        .env_clear()
        .envs([
            ("DATABASE_URL", db_url),
            // No broker is needed to serve; the consumer keeps retrying quietly.
            ("KAFKA_BROKERS", "127.0.0.1:1"),
            ("HTTP_ADDR", "127.0.0.1:0"),
            ("LOG_FORMAT", "json"),
            ("RUST_LOG", "info,rdkafka=off,order_service::ingest=off"),
            ("CACHE_WARMUP_ORDERS", &warmup.to_string()),
            ("CACHE_MAX_BYTES", &(4u64 << 30).to_string()),
        ])
        .envs(cpu.map(|_| ("HTTP_WORKERS", "1")))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (warm_tx, warm_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if let Some(addr) = v["addr"].as_str() {
                let _ = addr_tx.send(addr.to_owned());
            }
            if v["message"] == "warm-up done" {
                let _ = warm_tx.send(v["elapsed_ms"].as_u64().unwrap_or(0));
            }
        }
    });
    let addr = addr_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("service starts");
    (child, addr, warm_rx)
}

/// What one `oha` run measured: its rate and latencies (in ms).
struct Oha {
    requests_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    success: f64,
}

/// `oha` for `secs` from 64 connections to URLs picked at random from the
/// file `urls`: as fast as they answer, or paced at `rate` requests/s with
/// latency counted from when each request was due, so a stalled server is not
/// hidden by a stalled client (coordinated omission).
fn oha(urls: &std::path::Path, rate: Option<f64>, secs: u32, cpu: Option<&str>) -> Oha {
    let mut cmd = on_cpu("oha", cpu);
    cmd.args(["--no-tui", "--output-format", "json", "-c", "64"])
        .args(["-z", &format!("{secs}s"), "--urls-from-file"])
        .arg(urls);
    if let Some(rate) = rate {
        cmd.args(["--latency-correction", "-q", &format!("{rate:.0}")]);
    }
    let out = cmd
        .output()
        .expect("oha runs (scripts/bench-http installs it)");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "oha's report ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let seconds = |p: &str| -> f64 {
        report["latencyPercentiles"][p]
            .as_f64()
            .unwrap_or_else(|| panic!("{p} in {report}"))
    };
    Oha {
        requests_per_sec: report["summary"]["requestsPerSec"]
            .as_f64()
            .unwrap_or_else(|| panic!("requestsPerSec in {report}")),
        p50_ms: seconds("p50") * 1000.0,
        p99_ms: seconds("p99") * 1000.0,
        p999_ms: seconds("p99.9") * 1000.0,
        success: report["summary"]["successRate"].as_f64().unwrap_or(0.0),
    }
}

/// Files of URLs for oha: ours with random keys over all cached orders, and
/// nginx's one file as often, so both runs pay oha's cost of picking one.
fn url_files(
    dir: &std::path::Path,
    addr: &str,
    uids: &[String],
    port: u16,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let ours = dir.join(format!("urls-{port}.txt"));
    let urls: Vec<String> = uids
        .iter()
        .map(|uid| format!("http://{addr}/order/{uid}"))
        .collect();
    std::fs::write(&ours, urls.join("\n")).unwrap();
    let theirs = dir.join(format!("nginx-urls-{port}.txt"));
    std::fs::write(
        &theirs,
        format!("http://127.0.0.1:{port}/order.json\n").repeat(urls.len()),
    )
    .unwrap();
    (ours, theirs)
}

/// oha against both servers as fast as they answer, then paced at half of
/// our maximum, on `cpu` alone when given.
fn latencies((ours, theirs): &(std::path::PathBuf, std::path::PathBuf), cpu: Option<&str>) {
    let (ours_name, nginx_name) = (
        "order-service GET /order/{random uid}",
        "nginx static file (same JSON)        ",
    );
    println!("  oha -c64 -z5s as fast as answered, same run:");
    let ours_max = oha(ours, None, 5, cpu);
    print_oha(ours_name, &ours_max);
    print_oha(nginx_name, &oha(theirs, None, 5, cpu));
    let half = ours_max.requests_per_sec / 2.0;
    println!("  oha -c64 -z10s paced at half our maximum ({half:.0} req/s), same run:");
    print_oha(ours_name, &oha(ours, Some(half), 10, cpu));
    print_oha(nginx_name, &oha(theirs, Some(half), 10, cpu));
    println!("    (target: our p99 <= 2 ms)");
}

fn print_oha(name: &str, run: &Oha) {
    println!(
        "    {name}  {:>7.0} req/s  p50 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  ({:.1} % answered)",
        run.requests_per_sec,
        run.p50_ms,
        run.p99_ms,
        run.p999_ms,
        run.success * 100.0
    );
}

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let n: u64 = var("BENCH_HTTP_ORDERS", "100000").parse().unwrap();
    let admin = PgConnectOptions::from_str(&var(
        "TEST_DATABASE_URL",
        "postgres://order_owner:order_owner_local@127.0.0.1:5432/postgres",
    ))
    .unwrap();
    let role = var("TEST_SERVICE_ROLE", "order_service");
    let name = format!("bench_http_{}", std::process::id());
    let mut conn = admin.connect().await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .unwrap();
    let owner = admin.clone().database(&name);
    order_service::store::migrate(owner.clone(), &role, Duration::from_secs(30))
        .await
        .unwrap();
    let store = Store::with_options(
        PgPoolOptions::new().max_connections(2),
        owner,
        Settings::default().write_timeout(),
    );

    // Load N orders through the service's own write path, 2000 per transaction.
    let mut generator = Generator::new(7, 5);
    let mut uids = Vec::with_capacity(n as usize);
    let mut sample_json = Vec::new();
    let started = Instant::now();
    let mut loaded = 0u64;
    while loaded < n {
        let batch: Vec<Incoming> = (0..(n - loaded).min(2000))
            .map(|i| {
                let bytes = generator.valid().to_string();
                let order = parse_order(bytes.as_bytes(), &Limits::default()).unwrap();
                let json = bytes::Bytes::from(order.to_json());
                Incoming {
                    order,
                    json,
                    partition: 0,
                    offset: (loaded + i) as i64,
                }
            })
            .collect();
        uids.extend(batch.iter().map(|m| m.order.uid().to_string()));
        if sample_json.is_empty() {
            sample_json = batch[0].json.to_vec();
        }
        let mut tx = store.begin().await.unwrap();
        tx.insert_orders("bench", &batch).await.unwrap();
        tx.commit().await.unwrap();
        loaded += batch.len() as u64;
    }
    println!(
        "http benchmark: {n} orders loaded in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let url = format!(
        "postgres://{role}:{}@{}:{}/{name}",
        var("TEST_SERVICE_PASSWORD", "order_service_local"),
        admin.get_host(),
        admin.get_port()
    );
    let (mut service, addr, warm_rx) = start_service(&url, n, None);
    let warm_ms = warm_rx
        .recv_timeout(Duration::from_secs(600))
        .expect("warm-up finishes");
    let metrics = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let metric = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
            .unwrap()
            .parse()
            .unwrap()
    };
    let cached_bytes = metric("cache_bytes");
    let rss = process::memory_bytes(service.id(), "VmRSS") as f64;
    println!(
        "  warm-up: {n} orders in {warm_ms} ms = {:.0} orders/s   (target >= 100000/s at 1M)",
        n as f64 / (warm_ms.max(1) as f64 / 1000.0)
    );
    println!(
        "  memory: RSS {:.0} MiB, cached {:.0} MiB ({} entries); RSS / (1.5 x cached + 64 MiB) = {:.2}   (target <= 1)",
        rss / 1048576.0,
        cached_bytes / 1048576.0,
        metric("cache_entries"),
        rss / (1.5 * cached_bytes + 64.0 * 1048576.0)
    );

    let dir = tempfile::tempdir().unwrap();
    let uid_file = dir.path().join("uids.txt");
    std::fs::write(&uid_file, uids.join("\n")).unwrap();
    let script = dir.path().join("random.lua");
    std::fs::File::create(&script)
        .unwrap()
        .write_all(
            format!(
                "local uids = {{}}\nfor line in io.lines(\"{}\") do uids[#uids + 1] = line end\n\
                 math.randomseed(os.time())\n\
                 request = function() return wrk.format(\"GET\", \"/order/\" .. uids[math.random(#uids)]) end\n",
                uid_file.display()
            )
            .as_bytes(),
        )
        .unwrap();
    std::fs::write(dir.path().join("order.json"), &sample_json).unwrap();
    let nginx = start_nginx(dir.path(), 18081, "auto", None);

    let profile = std::env::var("BENCH_HTTP_PROFILE")
        .ok()
        .map(|file| profile_for(service.id(), &file, WRK_SECS));
    println!(
        "  wrk {} -d{WRK_SECS}s against each, same run:",
        WRK_ARGS.join(" ")
    );
    compare(
        (&addr, &script, service.id()),
        (18081, nginx.id()),
        None,
        || {
            if let Some((perf, file)) = profile {
                print_profile(perf, &file);
            }
        },
    );
    let urls = url_files(dir.path(), &addr, &uids, 18081);
    // oha costs far more CPU per request than wrk, and it shares the cores, so
    // "half our maximum" is half of what we answer to oha itself.
    latencies(&urls, None);

    stop_nginx(nginx);
    let _ = service.kill();
    let _ = service.wait();

    // On a machine of a few cores wrk and the server share them, so the
    // figures above move with how the scheduler splits them. Pinned, each
    // server has CPU 0 to itself (one worker) and wrk has CPU 1.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus >= 2 && Command::new("taskset").arg("-V").output().is_ok() {
        let (mut pinned, addr, warm_rx) = start_service(&url, n, Some("0"));
        warm_rx
            .recv_timeout(Duration::from_secs(600))
            .expect("warm-up finishes");
        let nginx = start_nginx(dir.path(), 18082, "1", Some("0"));
        println!("  pinned: each server on CPU 0 with one worker, wrk -t1 and oha on CPU 1:");
        compare(
            (&addr, &script, pinned.id()),
            (18082, nginx.id()),
            Some("1"),
            || {},
        );
        latencies(&url_files(dir.path(), &addr, &uids, 18082), Some("1"));
        stop_nginx(nginx);
        let _ = pinned.kill();
        let _ = pinned.wait();
    }
    store.pool().close().await;
    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&mut conn)
        .await;
}
