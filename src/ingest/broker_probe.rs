//! A broker can be up and still not answer in time: overloaded, or wedged
//! behind one long storage call (the local broker's single storage lane).
//! Consuming cannot tell that from a quiet topic, so a cheap request (the end
//! of one partition of the orders topic) is timed every few seconds; a slow or
//! missing answer is named in `/readyz` and logged once, and so is its end.
//! The same answer tells whether the orders topic exists: a missing one is
//! named too, rather than left to look like a group that never assigns.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode::{UnknownPartition, UnknownTopic, UnknownTopicOrPartition};
use tokio_util::sync::CancellationToken;

use crate::events::IngestHealth;
use crate::telemetry::Metrics;

const EVERY: Duration = Duration::from_secs(2);
/// A healthy broker answers in milliseconds; this is trouble.
const SLOW: Duration = Duration::from_secs(2);
/// Below the group's session timeout, so a frozen broker is named before the
/// consumer gives its session up.
const TIMEOUT: Duration = Duration::from_secs(5);

pub async fn watch(
    consumer: Arc<BaseConsumer>,
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
        let (consumer, asked) = (consumer.clone(), topic.clone());
        let started = Instant::now();
        let answer =
            tokio::task::spawn_blocking(move || consumer.fetch_watermarks(&asked, 0, TIMEOUT))
                .await;
        let took = started.elapsed();
        metrics.broker_probe_seconds.set(took.as_secs_f64());
        let missing = matches!(&answer, Ok(Err(e)) if matches!(
            e.rdkafka_error_code(),
            Some(UnknownPartition | UnknownTopic | UnknownTopicOrPartition)
        ));
        if matches!(answer, Ok(Ok(_))) || missing {
            report_missing(&health, &topic, missing);
        }
        let verdict = match answer {
            Ok(Ok(_)) if took < SLOW => None,
            Ok(Ok(_)) => Some(format!(
                "the broker took {:.1} s to answer a request for a partition's end",
                took.as_secs_f64()
            )),
            // The topic is not there (yet): an answer, told above.
            Ok(Err(_)) if missing => None,
            Ok(Err(e)) => Some(format!(
                "the broker did not answer a request for a partition's end ({e}, after {:.1} s)",
                took.as_secs_f64()
            )),
            Err(_) => continue,
        };
        if health.set_broker_slow(verdict.clone()) {
            match verdict {
                Some(problem) => tracing::warn!(
                    problem,
                    "the broker is slow: ingest lags until it answers in time again"
                ),
                None => tracing::info!("the broker answers in time again"),
            }
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
