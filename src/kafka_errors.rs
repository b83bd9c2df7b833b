//! What the service's Kafka clients report beside their answers: that the
//! brokers turn them away (a failed sign-in, a TLS handshake that failed) or
//! cannot be reached, and errors and log lines that librdkafka repeats many
//! times a second meanwhile.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::ClientContext;

use crate::lock;
use crate::telemetry::LogThrottle;

/// What the brokers' refusals and failed connections told a client, beside
/// its answers. librdkafka tells them only to the client's error callback
/// (requests then just time out), so the clients whose callbacks are served
/// all the time (a producer; the consumer that asks for partition ends) are
/// created with this as their context.
#[derive(Clone, Default)]
pub struct BrokerReports {
    refusal: Arc<Mutex<Option<String>>>,
    /// The last connection to a broker that could not be made, and when.
    unreachable: Arc<Mutex<Option<(String, Instant)>>>,
    logs: Arc<LogThrottle>,
}

/// How recent a failed connection must be to explain a request unanswered:
/// librdkafka tries again within a second at first, and every 10 s at most.
const UNREACHABLE_FOR: Duration = Duration::from_secs(15);

impl BrokerReports {
    /// Why the brokers last turned a client away, since one was last answered.
    pub fn refusal(&self) -> Option<String> {
        lock(&self.refusal).clone()
    }

    /// Why no connection to a broker could be made, if one failed lately
    /// and none was answered since.
    pub fn unreachable(&self) -> Option<String> {
        lock(&self.unreachable)
            .as_ref()
            .filter(|(_, at)| at.elapsed() < UNREACHABLE_FOR)
            .map(|(reason, _)| reason.clone())
    }

    fn cannot_connect(&self, reason: String) {
        *lock(&self.unreachable) = Some((reason, Instant::now()));
    }

    /// A broker answered: whatever kept the clients out has been mended.
    pub fn clear(&self) {
        *lock(&self.refusal) = None;
        *lock(&self.unreachable) = None;
    }
}

impl ClientContext for BrokerReports {
    fn error(&self, error: KafkaError, reason: &str) {
        use RDKafkaErrorCode::{
            AllBrokersDown, Authentication, BrokerTransportFailure, Resolve,
            SaslAuthenticationFailed, SSL,
        };
        match error.rdkafka_error_code() {
            Some(Authentication | SaslAuthenticationFailed | SSL) => {
                *lock(&self.refusal) = Some(reason.to_owned());
            }
            // Under TLS 1.3 a broker's refusal of the client's certificate
            // (or of its lack of one) arrives after the handshake, as an
            // OpenSSL alert on a connection librdkafka then calls failed.
            Some(BrokerTransportFailure) if reason.contains("SSL routines") => {
                *lock(&self.refusal) = Some(reason.to_owned());
            }
            // No connection could be made (refused, timed out while
            // connecting, a name that does not resolve): the broker is away,
            // not slow.
            Some(BrokerTransportFailure) if reason.contains("in state CONNECT") => {
                self.cannot_connect(reason.to_owned());
            }
            Some(Resolve) => self.cannot_connect(reason.to_owned()),
            // Says only how many are down: the last connection's reason stays.
            Some(AllBrokersDown) => {
                let last = lock(&self.unreachable).take();
                self.cannot_connect(last.map_or(reason.to_owned(), |(last, _)| last));
            }
            _ => {}
        }
        if self.logs.worth_logging(&error.to_string()) {
            tracing::error!(%error, reason, "kafka client error");
        }
    }

    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        log(&self.logs, level, fac, message);
    }
}

/// A librdkafka log line, as the client library forwards it, unless the same
/// line was logged in the last minute: while a broker fails a request (a full
/// disk, say), librdkafka logs each retry, twice a second.
pub fn log(throttle: &LogThrottle, level: RDKafkaLogLevel, fac: &str, message: &str) {
    use RDKafkaLogLevel::{Alert, Critical, Debug, Emerg, Error, Info, Notice, Warning};
    if !matches!(level, Debug) && !throttle.worth_logging(&format!("{fac} {message}")) {
        return;
    }
    match level {
        Emerg | Alert | Critical | Error => {
            tracing::error!(target: "librdkafka", "librdkafka: {fac} {message}");
        }
        Warning => tracing::warn!(target: "librdkafka", "librdkafka: {fac} {message}"),
        Notice | Info => tracing::info!(target: "librdkafka", "librdkafka: {fac} {message}"),
        Debug => tracing::debug!(target: "librdkafka", "librdkafka: {fac} {message}"),
    }
}

impl ConsumerContext for BrokerReports {}

#[cfg(test)]
mod tests {
    use super::*;

    fn told(reports: &BrokerReports, code: RDKafkaErrorCode, reason: &str) {
        reports.error(KafkaError::Global(code), reason);
    }

    #[test]
    fn failed_connections_and_refusals_are_told_apart() {
        use RDKafkaErrorCode::{AllBrokersDown, BrokerTransportFailure, SaslAuthenticationFailed};
        let reports = BrokerReports::default();
        // A connection that was made and then lost says nothing of either.
        told(
            &reports,
            BrokerTransportFailure,
            "127.0.0.1:9092/1: Disconnected (after 5012ms in state UP)",
        );
        told(&reports, AllBrokersDown, "1/1 brokers are down");
        assert_eq!(
            reports.unreachable().as_deref(),
            Some("1/1 brokers are down")
        );
        let refused = "127.0.0.1:9092/bootstrap: Connect to ipv4#127.0.0.1:9092 failed: \
                       Connection refused (after 0ms in state CONNECT)";
        told(&reports, BrokerTransportFailure, refused);
        // The count of brokers down keeps the connection's own reason.
        told(&reports, AllBrokersDown, "1/1 brokers are down");
        assert_eq!(reports.unreachable().as_deref(), Some(refused));
        assert_eq!(reports.refusal(), None);
        told(
            &reports,
            SaslAuthenticationFailed,
            "SASL authentication error: wrong password",
        );
        assert!(reports
            .refusal()
            .is_some_and(|r| r.contains("wrong password")));
        reports.clear();
        assert_eq!((reports.unreachable(), reports.refusal()), (None, None));
        told(
            &reports,
            BrokerTransportFailure,
            "127.0.0.1:9092/1: Disconnected (after 5012ms in state UP)",
        );
        assert_eq!(reports.unreachable(), None);
    }
}
