//! A broker can be up and still not answer in time: overloaded, or wedged
//! behind one long storage call (the local broker's single storage lane).
//! Consuming cannot tell that from a quiet topic, so a cheap request (the end
//! of one partition of the orders topic) is timed every few seconds; a slow or
//! missing answer is named in `/readyz` and logged once, and so is its end.
//! The same answer tells whether the orders topic exists: a missing one is
//! named too, rather than left to look like a group that never assigns. And
//! a broker that turns the service away (failed sign-in, untrusted
//! certificate), or that no connection can be made to, is named with its
//! reason, rather than as one that is slow.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode::{UnknownPartition, UnknownTopic, UnknownTopicOrPartition};
use tokio_util::sync::CancellationToken;

use crate::events::{BrokerTrouble, IngestHealth};
use crate::kafka_errors::BrokerReports;
use crate::telemetry::Metrics;

const EVERY: Duration = Duration::from_secs(2);
/// A healthy broker answers in milliseconds; this is trouble.
const SLOW: Duration = Duration::from_secs(2);
/// Below the group's session timeout, so a frozen broker is named before the
/// consumer gives its session up.
const TIMEOUT: Duration = Duration::from_secs(5);

pub async fn watch(
    consumer: Arc<BaseConsumer<BrokerReports>>,
    broker_reports: BrokerReports,
    topic: String,
    health: Arc<IngestHealth>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(EVERY) => {}
        }
        let (client, asked) = (consumer.clone(), topic.clone());
        let started = Instant::now();
        let answer = tokio::task::spawn_blocking(move || {
            let answer = client.fetch_watermarks(&asked, 0, TIMEOUT);
            // Nothing else polls this client: its error events (one per failed
            // connection while the brokers are away) are told to its context
            // here, or they would pile up for as long as an outage lasts.
            for _ in 0..10_000 {
                if client.poll(Duration::ZERO).is_none() {
                    break;
                }
            }
            answer
        })
        .await;
        let took = started.elapsed();
        metrics.broker_probe_seconds.set(took.as_secs_f64());
        let missing = matches!(&answer, Ok(Err(e)) if matches!(
            e.rdkafka_error_code(),
            Some(UnknownPartition | UnknownTopic | UnknownTopicOrPartition)
        ));
        if matches!(answer, Ok(Ok(_))) || missing {
            report_missing(&health, &topic, missing);
            broker_reports.clear();
        }
        let refusal = broker_reports.refusal();
        metrics.broker_refused.set(i64::from(refusal.is_some()));
        report_refusal(&health, refusal.clone());
        let waited = took.as_secs_f64();
        let verdict = match answer {
            // Turned away: not slow, and told above.
            _ if refusal.is_some() => None,
            Ok(Ok(_)) if took < SLOW => None,
            Ok(Ok(_)) => Some(BrokerTrouble::Slow(format!(
                "the broker took {waited:.1} s to answer a request for a partition's end"
            ))),
            // The topic is not there (yet): an answer, told above.
            Ok(Err(_)) if missing => None,
            Ok(Err(e)) => Some(match broker_reports.unreachable() {
                Some(reason) => BrokerTrouble::Unreachable(format!(
                    "the broker cannot be reached ({reason}); a request for a partition's end \
                     failed after {waited:.1} s ({e})"
                )),
                None => BrokerTrouble::Slow(format!(
                    "the broker did not answer a request for a partition's end ({e}, after \
                     {waited:.1} s)"
                )),
            }),
            Err(_) => continue,
        };
        if health.set_broker_trouble(verdict.clone()) {
            match verdict {
                Some(BrokerTrouble::Slow(problem)) => tracing::warn!(
                    problem,
                    "the broker is slow: ingest lags until it answers in time again"
                ),
                Some(BrokerTrouble::Unreachable(problem)) => tracing::warn!(
                    problem,
                    "the broker cannot be reached: ingest waits until it can"
                ),
                None => tracing::info!("the broker answers in time again"),
            }
        }
    }
}

/// Names the brokers' refusal of this client once, and its end.
fn report_refusal(health: &IngestHealth, refusal: Option<String>) {
    if health.set_broker_refused(refusal.clone()) {
        match refusal {
            Some(reason) => tracing::error!(
                reason,
                "the broker refuses this client: nothing is consumed until it lets it in \
                 (KAFKA_SECURITY_PROTOCOL, KAFKA_SASL_*, KAFKA_SSL_*)"
            ),
            None => tracing::info!("the broker lets this client in again"),
        }
    }
}

/// Names a missing orders topic once, and its arrival.
fn report_missing(health: &IngestHealth, topic: &str, missing: bool) {
    if health.set_missing_topic(missing.then(|| topic.to_owned())) {
        if missing {
            tracing::warn!(
                topic,
                "the orders topic does not exist on the broker: nothing is consumed until it is \
                 created (KAFKA_TOPIC names it)"
            );
        } else {
            tracing::info!(topic, "the orders topic exists now");
        }
    }
}
