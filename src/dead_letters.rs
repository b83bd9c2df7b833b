//! `dead-letters`: the record of rejected messages for scripts, and their
//! replay once whatever rejected them is mended.

use std::io::Write;
use std::time::Instant;

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::builder::PossibleValuesParser;
use clap::{Args, Subcommand};
use futures::stream::{FuturesUnordered, StreamExt};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;

use crate::configuration::Settings;
use crate::domain::LETTER_STAGES;
use crate::ingest::dead_letter::header;
use crate::publish::{drain, order_producer, OrderProducer};
use crate::signals::stop_requested;
use crate::store::{Cursor, LetterFilter, LetterRecord, Store};

/// Letters read from PostgreSQL per query.
const PAGE: i64 = 500;
/// Replays waiting for the broker's answer before more are sent.
const MAX_IN_FLIGHT: usize = 10_000;

#[derive(Debug, Subcommand)]
pub enum DeadLettersCommand {
    /// Print recorded dead letters as JSON lines, newest first, as GET /api/dead-letters shows them.
    List(ListArgs),
    /// Send the original key and bytes of matching letters to the orders topic again.
    ///
    /// Each replayed message carries a `dlq-replay-of` header naming its letter. An order
    /// already stored is not stored twice; a message rejected again gets a new letter that
    /// links to the first one. Only original letters are replayed, never letters of replays,
    /// so replaying cannot loop.
    Replay(ReplayArgs),
}

/// Which letters: every option given narrows the choice.
#[derive(Debug, Args)]
pub struct Selection {
    /// Letters of this stage only.
    #[arg(long, value_name = "STAGE", value_parser = PossibleValuesParser::new(LETTER_STAGES))]
    stage: Option<String>,
    /// Letters recorded at or after this time (RFC 3339, e.g. 2026-01-31T12:00:00Z).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    since: Option<DateTime<Utc>>,
    /// Letters of messages that claimed this order id.
    #[arg(long, value_name = "ID")]
    order_uid: Option<String>,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    selection: Selection,
    /// Letters of messages with this key.
    #[arg(long, value_name = "KEY")]
    key: Option<String>,
    /// Most letters printed.
    #[arg(long, value_name = "N", default_value_t = 100)]
    limit: u64,
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    selection: Selection,
    /// Print the letters that would be replayed (JSON lines) and send nothing.
    #[arg(long)]
    dry_run: bool,
}

fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("{e}; expected RFC 3339, e.g. 2026-01-31T12:00:00Z"))
}

impl Selection {
    fn filter(self, settings: &Settings) -> LetterFilter {
        LetterFilter {
            source_topic: Some(settings.kafka.topic.clone()),
            order_uid: self.order_uid,
            stage: self.stage,
            since: self.since,
            ..LetterFilter::default()
        }
    }
}

/// Runs the command; `Ok(false)` when a replay was not confirmed in full.
pub async fn run(command: DeadLettersCommand, settings: &Settings) -> anyhow::Result<bool> {
    let store = Store::connect_lazy(
        settings.service_options()?,
        1,
        settings.connect_timeout(),
        settings.write_timeout(),
    );
    match command {
        DeadLettersCommand::List(args) => list(&store, args, settings).await.map(|()| true),
        DeadLettersCommand::Replay(args) => replay(&store, args, settings).await,
    }
}

async fn list(store: &Store, args: ListArgs, settings: &Settings) -> anyhow::Result<()> {
    let filter = LetterFilter {
        key: args.key.map(String::into_bytes),
        ..args.selection.filter(settings)
    };
    let mut out = std::io::stdout().lock();
    let mut left = i64::try_from(args.limit).unwrap_or(i64::MAX);
    let mut before = None;
    while left > 0 {
        let want = PAGE.min(left);
        let page = page(store, &filter, Cursor::Before(before), want).await?;
        for letter in &page {
            print(&mut out, letter)?;
        }
        if (page.len() as i64) < want {
            break;
        }
        left -= want;
        before = page.last().map(|l| l.id);
    }
    Ok(())
}

/// One page of letters, or why PostgreSQL gave none: a session refused, or
/// no answer within the write timeout.
async fn page(
    store: &Store,
    filter: &LetterFilter,
    cursor: Cursor,
    limit: i64,
) -> anyhow::Result<Vec<LetterRecord>> {
    match store
        .answered(store.dead_letters(filter, cursor, limit))
        .await
    {
        Ok(page) => Ok(page),
        Err(e) => Err(store.explained(e).await).context("DATABASE_URL: cannot read dead letters"),
    }
}

/// One letter as one line of JSON.
fn print(out: &mut impl Write, letter: &LetterRecord) -> anyhow::Result<()> {
    serde_json::to_writer(&mut *out, &letter.summary()).context("writing to stdout")?;
    writeln!(out).context("writing to stdout")
}

#[derive(Debug, Default)]
struct Tally {
    selected: u64,
    sent: u64,
    delivered: u64,
    failed: u64,
    /// Letters whose original is not held: too large to read at all.
    too_large: u64,
    /// Letters whose record holds only the first bytes of the original.
    partial: u64,
}

async fn replay(store: &Store, args: ReplayArgs, settings: &Settings) -> anyhow::Result<bool> {
    let topic = &settings.kafka.topic;
    let producer = if args.dry_run {
        None
    } else {
        Some(order_producer(&settings.kafka).await?)
    };
    let filter = LetterFilter {
        originals_only: true,
        ..args.selection.filter(settings)
    };
    let started = Instant::now();
    let mut tally = Tally::default();
    let mut in_flight = FuturesUnordered::new();
    let mut out = std::io::stdout().lock();
    let mut after = 0;
    let stop = stop_requested();
    tokio::pin!(stop);
    let mut interrupted = false;
    'pages: loop {
        let page = page(store, &filter, Cursor::After(after), PAGE).await?;
        let Some(last) = page.last() else { break };
        after = last.id;
        for letter in &page {
            tally.selected += 1;
            if !replayable(letter, settings, &mut tally) {
                continue;
            }
            let Some(producer) = &producer else {
                print(&mut out, letter)?;
                continue;
            };
            let delivery = send(producer, topic, letter)?;
            tally.sent += 1;
            in_flight.push(delivery);
            while in_flight.len() >= MAX_IN_FLIGHT {
                tokio::select! {
                    _ = &mut stop => { interrupted = true; break 'pages; }
                    Some(result) = in_flight.next() => settle(&mut tally, result),
                }
            }
        }
    }
    // A fresh listener: the first may have fired already (a second stop
    // then ends the wait).
    let unconfirmed = drain(&mut in_flight, stop_requested(), |result| {
        settle(&mut tally, result)
    })
    .await;
    let verb = if args.dry_run {
        "would replay"
    } else {
        "replayed"
    };
    eprintln!(
        "{} letter(s) selected; {verb} {}, delivered {}, failed {}",
        tally.selected,
        tally.selected - tally.too_large - tally.partial,
        tally.delivered,
        tally.failed
    );
    if tally.too_large + tally.partial > 0 {
        eprintln!(
            "skipped {}: {} too large to have been read, {} held only in part (see above)",
            tally.too_large + tally.partial,
            tally.too_large,
            tally.partial
        );
    }
    if interrupted || unconfirmed > 0 {
        eprintln!(
            "interrupted: {unconfirmed} sent and not confirmed; letters after the last one sent were not replayed"
        );
    }
    eprintln!("in {:.1} s", started.elapsed().as_secs_f64());
    Ok(tally.failed == 0 && unconfirmed == 0 && !interrupted)
}

/// Whether the record holds the whole original, so that it can be sent again.
fn replayable(letter: &LetterRecord, settings: &Settings, tally: &mut Tally) -> bool {
    if letter.stage == "too_large" {
        tally.too_large += 1;
        return false;
    }
    if !letter.holds_whole_payload() {
        tally.partial += 1;
        eprintln!(
            "skipped {}: its record holds {} of {} bytes (DEAD_LETTER_PREVIEW_BYTES); the whole \
             original is on {}",
            letter.position(),
            letter.payload_preview.len(),
            letter.payload_bytes,
            settings.kafka.dlq_topic
        );
        return false;
    }
    true
}

type Delivery = rdkafka::producer::DeliveryFuture;

fn send(producer: &OrderProducer, topic: &str, letter: &LetterRecord) -> anyhow::Result<Delivery> {
    let position = letter.position();
    let headers = OwnedHeaders::new().insert(Header {
        key: header::REPLAY_OF,
        value: Some(&position),
    });
    let mut record = FutureRecord::<[u8], [u8]>::to(topic)
        .payload(&letter.payload_preview[..])
        .headers(headers);
    if let Some(key) = &letter.message_key {
        record = record.key(&key[..]);
    }
    producer
        .send_result(record)
        .map_err(|(e, _)| e)
        .with_context(|| format!("{topic}: cannot queue the replay of {position}"))
}

fn settle(
    tally: &mut Tally,
    result: Result<
        rdkafka::producer::future_producer::OwnedDeliveryResult,
        futures::channel::oneshot::Canceled,
    >,
) {
    match result {
        Ok(Ok(_)) => tally.delivered += 1,
        Ok(Err((e, _))) => {
            tracing::warn!(error = %e, "replay not delivered");
            tally.failed += 1;
        }
        Err(_) => tally.failed += 1,
    }
}
