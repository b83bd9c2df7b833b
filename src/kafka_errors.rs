//! What the service's Kafka clients report beside their answers: that the
//! brokers turn them away (a failed sign-in, a TLS handshake that failed),
//! and errors that librdkafka repeats many times a second while the brokers
//! cannot be reached.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::ClientContext;

/// Why the brokers last turned a client away, with their reason. librdkafka
/// tells it only to the client's error callback (requests then just time
/// out), so a producer, whose callbacks are served all the time, is created
/// with this as its context.
#[derive(Clone, Default)]
pub struct Refusals {
    last: Arc<Mutex<Option<String>>>,
    logs: Arc<LogThrottle>,
}

impl Refusals {
    /// Why the brokers last turned a client away, since one was last answered.
    pub fn last(&self) -> Option<String> {
        self.slot().clone()
    }

    /// A broker answered: whatever turned the clients away has been mended.
    pub fn clear(&self) {
        *self.slot() = None;
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.last.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl ClientContext for Refusals {
    fn error(&self, error: KafkaError, reason: &str) {
        use RDKafkaErrorCode::{
            Authentication, BrokerTransportFailure, SaslAuthenticationFailed, SSL,
        };
        let refused = match error.rdkafka_error_code() {
            Some(Authentication | SaslAuthenticationFailed | SSL) => true,
            // Under TLS 1.3 a broker's refusal of the client's certificate
            // (or of its lack of one) arrives after the handshake, as an
            // OpenSSL alert on a connection librdkafka then calls failed.
            Some(BrokerTransportFailure) => reason.contains("SSL routines"),
            _ => false,
        };
        if refused {
            *self.slot() = Some(reason.to_owned());
        }
        if self.logs.worth_logging(&error.to_string()) {
            tracing::error!(%error, reason, "kafka client error");
        }
    }
}

/// How often the same error is logged again.
const RELOG_AFTER: Duration = Duration::from_secs(60);

/// Each distinct error is logged once a minute at most.
#[derive(Default)]
pub struct LogThrottle {
    /// When each error text was last logged. Its texts name an error code,
    /// not a reason, so they are few.
    logged: Mutex<HashMap<String, Instant>>,
}

impl LogThrottle {
    /// Whether `error` is worth a log line: not logged in the last minute.
    pub fn worth_logging(&self, error: &str) -> bool {
        let mut logged = self.logged.lock().unwrap_or_else(|e| e.into_inner());
        match logged.get(error) {
            Some(at) if at.elapsed() < RELOG_AFTER => false,
            _ => {
                logged.insert(error.to_owned(), Instant::now());
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_is_logged_once_a_minute() {
        let throttle = LogThrottle::default();
        assert!(throttle.worth_logging("AllBrokersDown"));
        assert!(throttle.worth_logging("SSL"));
        assert!(!throttle.worth_logging("AllBrokersDown"));
        assert!(!throttle.worth_logging("SSL"));
    }
}
