//! Why the brokers turn the service away (a failed sign-in, a TLS handshake
//! that failed), with their reason. librdkafka tells it only to a client's
//! error callback; requests then just time out. The dead-letter producer's
//! callbacks are served all the time, so it listens for them.

use std::sync::{Arc, Mutex};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::ClientContext;

#[derive(Clone, Default)]
pub struct Refusals(Arc<Mutex<Option<String>>>);

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
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl ClientContext for Refusals {
    fn error(&self, error: KafkaError, reason: &str) {
        use RDKafkaErrorCode::{Authentication, SaslAuthenticationFailed, SSL};
        if matches!(
            error.rdkafka_error_code(),
            Some(Authentication | SaslAuthenticationFailed | SSL)
        ) {
            *self.slot() = Some(reason.to_owned());
        }
        tracing::error!(%error, reason, "kafka client error");
    }
}
