//! `order-service produce`: orders to the orders topic at a chosen rate.

mod generator;

use std::collections::VecDeque;
use std::io::IsTerminal;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use futures::stream::{FuturesUnordered, StreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureRecord, Producer};
use tokio::sync::mpsc;
use tokio::time::Instant;

pub use self::generator::{Generator, InvalidKind};
use crate::configuration::KafkaSettings;
use crate::documents::{for_each_document, Document, Format};
use crate::publish::{drain, order_producer, MAX_MESSAGE_BYTES};
use crate::signals::stop_requested;

#[derive(Debug, clap::Args)]
pub struct ProduceArgs {
    /// Orders per second; 0 sends as fast as the broker takes them
    #[arg(long, default_value_t = 100.0, value_name = "N", value_parser = parse_rate)]
    pub rate: f64,
    /// Stop after this many messages [default: run until Ctrl-C or SIGTERM]
    #[arg(long, value_name = "N", conflicts_with = "duration")]
    pub count: Option<u64>,
    /// Stop after this long, e.g. 30s, 5m, 1h
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Seed of the generator; the same seed sends the same orders
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub seed: u64,
    /// Share of generated orders broken at field level (0.0 to 1.0), cycling through the kinds of rule
    #[arg(long, default_value_t = 0.0, value_name = "F", value_parser = parse_share)]
    pub invalid_rate: f64,
    /// Number of non-JSON and truncated-JSON payloads, spread over the run
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub malformed: u64,
    /// Share of messages that are exact re-sends of an earlier order (0.0 to 1.0)
    #[arg(long, default_value_t = 0.0, value_name = "F", value_parser = parse_share)]
    pub duplicate_rate: f64,
    /// Send the documents of a file instead of generated orders
    #[arg(long, value_name = "PATH")]
    pub file: Option<PathBuf>,
    /// How the documents of --file are laid out [default: ndjson for a .ndjson
    /// or .jsonl file, array when the file starts with `[`, concatenated when
    /// its first document spans lines, otherwise ndjson]
    #[arg(long, value_enum, value_name = "FORMAT", requires = "file")]
    pub format: Option<Format>,
    /// Also write every message to this NDJSON file; `-` writes them to
    /// standard output (the summary goes to standard error)
    #[arg(long, value_name = "PATH|-")]
    pub output: Option<PathBuf>,
    /// Only write --output; send nothing
    #[arg(long, requires = "output")]
    pub dry_run: bool,
    /// Most items in a generated order (1 to 1000, the service's default VALIDATION_MAX_ITEMS)
    #[arg(long, default_value_t = 5, value_name = "N",
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1000))]
    pub max_items: usize,
}

fn parse_share(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err("must be a number from 0.0 to 1.0".into()),
    }
}

/// A bare number is seconds; anything else as humantime reads it (30s, 5m, 1h 30m).
fn parse_duration(s: &str) -> Result<Duration, String> {
    match s.parse::<u64>() {
        Ok(seconds) => Ok(Duration::from_secs(seconds)),
        Err(_) => humantime::parse_duration(s)
            .map_err(|e| format!("{s:?} is not a duration like 30s, 5m or 1h ({e})")),
    }
}

/// Orders per second: 0 (as fast as the broker takes them) or a rate whose
/// interval a clock can count, from one a day to ten million a second.
fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v == 0.0 || (1.0 / 86_400.0..=1e7).contains(&v) => Ok(v),
        _ => Err(
            "must be 0 or a number of orders per second from 0.0000116 (one a day) to 10000000"
                .into(),
        ),
    }
}

/// One message to send, and what kind it is for the summary.
struct Outgoing {
    key: Option<String>,
    payload: Vec<u8>,
    kind: Kind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Valid,
    Invalid,
    Malformed,
    Duplicate,
    File,
}

impl Kind {
    const ALL: [Kind; 5] = [
        Kind::Valid,
        Kind::Invalid,
        Kind::Malformed,
        Kind::Duplicate,
        Kind::File,
    ];

    fn name(self) -> &'static str {
        match self {
            Kind::Valid => "valid",
            Kind::Invalid => "invalid",
            Kind::Malformed => "malformed",
            Kind::Duplicate => "duplicate",
            Kind::File => "file",
        }
    }
}

#[derive(Default)]
struct Tally {
    sent: [u64; 5],
    delivered: [u64; 5],
    failed: [u64; 5],
}

impl Tally {
    fn total(counts: &[u64; 5]) -> u64 {
        counts.iter().sum()
    }

    fn print(&self) {
        eprintln!(
            "sent {}, delivered {}, failed {}",
            Self::total(&self.sent),
            Self::total(&self.delivered),
            Self::total(&self.failed)
        );
        for kind in Kind::ALL {
            let i = kind as usize;
            if self.sent[i] > 0 {
                eprintln!(
                    "  {:<10} sent {:>8}  delivered {:>8}  failed {:>6}",
                    kind.name(),
                    self.sent[i],
                    self.delivered[i],
                    self.failed[i]
                );
            }
        }
    }
}

/// Hands over the documents of `path`, as they are, each keyed by its
/// `order_uid` when it has one.
fn send_file(
    path: &std::path::Path,
    format: Option<Format>,
    limit: Option<u64>,
    tx: &mpsc::Sender<anyhow::Result<Outgoing>>,
) -> anyhow::Result<()> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("--file: cannot open {}", path.display()))?;
    let (mut sent, mut position, mut too_large) = (0u64, 0u64, None);
    let summary = for_each_document(
        std::io::BufReader::new(file),
        format,
        MAX_MESSAGE_BYTES,
        |doc| {
            position += 1;
            let doc = match doc {
                Document::Bytes(doc) => doc,
                Document::TooLarge { bytes } => {
                    too_large = Some(bytes);
                    return ControlFlow::Break(());
                }
            };
            let key = serde_json::from_slice::<serde_json::Value>(doc)
                .ok()
                .and_then(|v| v.get("order_uid")?.as_str().map(str::to_owned));
            let message = Outgoing {
                key,
                payload: doc.to_vec(),
                kind: Kind::File,
            };
            sent += 1;
            if tx.blocking_send(Ok(message)).is_err() || limit.is_some_and(|l| sent >= l) {
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        },
    )
    .with_context(|| {
        format!(
            "--file: reading {} after document #{position}",
            path.display()
        )
    })?;
    if let Some(bytes) = too_large {
        anyhow::bail!(
            "--file: document #{position} of {} is {bytes} bytes; \
             a message may have at most {MAX_MESSAGE_BYTES}",
            path.display()
        );
    }
    if summary.blank_lines > 0 {
        eprintln!("--file: {} blank lines skipped", summary.blank_lines);
    }
    Ok(())
}

/// Generates the messages of a run on a blocking thread (a file may be large)
/// and hands them over through a bounded channel.
fn spawn_source(args: &ProduceArgs) -> mpsc::Receiver<anyhow::Result<Outgoing>> {
    let (tx, rx) = mpsc::channel(4096);
    let file = args.file.clone();
    let format = args
        .format
        .or_else(|| file.as_deref().and_then(Format::of_path));
    let (seed, max_items, invalid_rate, duplicate_rate, malformed) = (
        args.seed,
        args.max_items,
        args.invalid_rate,
        args.duplicate_rate,
        args.malformed,
    );
    let limit = args.count;
    tokio::task::spawn_blocking(move || {
        if let Some(path) = file {
            if let Err(e) = send_file(&path, format, limit, &tx) {
                let _ = tx.blocking_send(Err(e));
            }
            return;
        }
        let mut generator = Generator::new(seed, max_items);
        let mut recent: VecDeque<(String, Vec<u8>)> = VecDeque::with_capacity(1000);
        let (mut n, mut invalid_seq) = (0u64, 0usize);
        // Malformed payloads are spread evenly over a counted run, or sent one every 100 otherwise.
        let malformed_every = match limit {
            Some(count) if malformed > 0 => (count / malformed).max(1),
            _ => 100,
        };
        let mut malformed_left = malformed;
        loop {
            if limit.is_some_and(|l| n >= l) {
                return;
            }
            n += 1;
            let message = if malformed_left > 0 && n % malformed_every == 0 {
                malformed_left -= 1;
                Outgoing {
                    key: None,
                    payload: generator.malformed(),
                    kind: Kind::Malformed,
                }
            } else if !recent.is_empty() && generator.chance(duplicate_rate) {
                let (key, payload) = recent[n as usize % recent.len()].clone();
                Outgoing {
                    key: Some(key),
                    payload,
                    kind: Kind::Duplicate,
                }
            } else if generator.chance(invalid_rate) {
                let kind = InvalidKind::ALL[invalid_seq % InvalidKind::ALL.len()];
                invalid_seq += 1;
                let order = generator.invalid(kind);
                let key = order["order_uid"].as_str().map(str::to_owned);
                Outgoing {
                    key,
                    payload: order.to_string().into_bytes(),
                    kind: Kind::Invalid,
                }
            } else {
                let order = generator.valid();
                let key = order["order_uid"].as_str().unwrap_or_default().to_owned();
                let payload = order.to_string().into_bytes();
                if recent.len() == recent.capacity() {
                    recent.pop_front();
                }
                recent.push_back((key.clone(), payload.clone()));
                Outgoing {
                    key: Some(key),
                    payload,
                    kind: Kind::Valid,
                }
            };
            if tx.blocking_send(Ok(message)).is_err() {
                return;
            }
        }
    });
    rx
}

/// Sends the run and prints a summary. Returns false if any delivery failed.
pub async fn run(args: ProduceArgs, kafka: &KafkaSettings) -> anyhow::Result<bool> {
    let producer = if args.dry_run {
        None
    } else {
        Some(order_producer(kafka).await?)
    };
    let mut output = match &args.output {
        None => None,
        Some(path) => {
            let sink: Box<dyn std::io::Write + Send> = if path.as_os_str() == "-" {
                Box::new(std::io::stdout())
            } else {
                Box::new(
                    std::fs::File::create(path)
                        .with_context(|| format!("--output: cannot create {}", path.display()))?,
                )
            };
            Some(std::io::BufWriter::new(sink))
        }
    };
    let progress = Progress::new(args.count);
    let mut source = spawn_source(&args);
    let mut tally = Tally::default();
    let mut in_flight = FuturesUnordered::new();
    let started = Instant::now();
    // A duration past what the clock can hold means no deadline.
    let deadline = args.duration.and_then(|d| started.checked_add(d));
    let interval = (args.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / args.rate));
    let stop = stop_requested();
    tokio::pin!(stop);
    let mut n: u32 = 0;

    'send: loop {
        if let Some(interval) = interval {
            let due = started + interval * n;
            if due > Instant::now() {
                tokio::select! {
                    _ = &mut stop => break 'send,
                    () = tokio::time::sleep_until(due) => {}
                    Some(result) = in_flight.next(), if !in_flight.is_empty() => { settle(&mut tally, result); continue 'send; }
                }
            }
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        let message = tokio::select! {
            _ = &mut stop => break 'send,
            message = source.recv() => match message {
                Some(message) => message?,
                None => break 'send,
            },
        };
        n = n.saturating_add(1);
        if let Some(out) = &mut output {
            use std::io::Write;
            // A line break in well-formed JSON is white space, so a
            // pretty-printed document keeps its meaning on one NDJSON line.
            let line: Vec<u8> = message
                .payload
                .iter()
                .map(|&b| if b == b'\n' || b == b'\r' { b' ' } else { b })
                .collect();
            out.write_all(&line)
                .and_then(|()| out.write_all(b"\n"))
                .context("--output: write failed")?;
        }
        tally.sent[message.kind as usize] += 1;
        progress.tick(Tally::total(&tally.sent));
        let Some(producer) = &producer else {
            tally.delivered[message.kind as usize] += 1;
            continue;
        };
        loop {
            let mut record = FutureRecord::<str, [u8]>::to(&kafka.topic).payload(&message.payload);
            if let Some(key) = &message.key {
                record = record.key(key.as_str());
            }
            match producer.send_result(record) {
                Ok(delivery) => {
                    let kind = message.kind;
                    in_flight.push(async move { (kind, delivery.await) });
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    if let Some(result) = in_flight.next().await {
                        settle(&mut tally, result);
                    }
                }
                Err((e, _)) => {
                    tracing::error!(error = %e, "cannot queue a message");
                    tally.failed[message.kind as usize] += 1;
                    break;
                }
            }
        }
    }

    // Whatever is in flight is delivered (or fails) before the summary; a
    // stop (a second one, if the first ended the run) ends the wait.
    let unconfirmed = drain(&mut in_flight, stop_requested(), |result| {
        settle(&mut tally, result)
    })
    .await;
    if let (Some(producer), 0) = (&producer, unconfirmed) {
        producer.flush(Duration::from_secs(30)).ok();
    }
    if let Some(mut out) = output {
        use std::io::Write;
        out.flush().context("--output: write failed")?;
    }
    progress.finish();
    let elapsed = started.elapsed().as_secs_f64();
    tally.print();
    if unconfirmed > 0 {
        eprintln!("{unconfirmed} not confirmed by the broker (interrupted while waiting)");
    }
    eprintln!(
        "in {elapsed:.1} s ({:.0} messages/s)",
        Tally::total(&tally.sent) as f64 / elapsed.max(0.001)
    );
    Ok(Tally::total(&tally.failed) == 0 && unconfirmed == 0)
}

type DeliveryResult = Result<
    rdkafka::producer::future_producer::Delivery,
    (KafkaError, rdkafka::message::OwnedMessage),
>;

fn settle(
    tally: &mut Tally,
    (kind, result): (
        Kind,
        Result<DeliveryResult, futures::channel::oneshot::Canceled>,
    ),
) {
    match result {
        Ok(Ok(_)) => tally.delivered[kind as usize] += 1,
        Ok(Err((e, _))) => {
            tracing::warn!(error = %e, "delivery failed");
            tally.failed[kind as usize] += 1;
        }
        Err(_) => tally.failed[kind as usize] += 1,
    }
}

/// A bar on a terminal, a line every few seconds otherwise.
struct Progress {
    bar: Option<ProgressBar>,
    last_line: std::cell::Cell<Instant>,
}

impl Progress {
    fn new(count: Option<u64>) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = match count {
                Some(n) => ProgressBar::new(n),
                None => ProgressBar::new_spinner(),
            };
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} {wide_bar} {pos}/{len} sent, {per_sec}, {elapsed}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar
        });
        Self {
            bar,
            last_line: std::cell::Cell::new(Instant::now()),
        }
    }

    fn tick(&self, sent: u64) {
        match &self.bar {
            Some(bar) => bar.set_position(sent),
            None if self.last_line.get().elapsed() >= Duration::from_secs(5) => {
                self.last_line.set(Instant::now());
                eprintln!("sent {sent}");
            }
            None => {}
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_shares_parse() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1h 30m").unwrap(), Duration::from_secs(5400));
        assert!(parse_duration("soon").is_err());
        assert!(
            parse_duration("99999999999999999999h").is_err(),
            "no overflow panic"
        );
        assert!(parse_rate("0").is_ok() && parse_rate("1000").is_ok());
        for bad in ["-1", "1e-300", "1e300", "NaN", "inf"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
        assert!(parse_share("0.25").is_ok());
        assert!(parse_share("1.5").is_err());
    }
}
