//! Log lines that would repeat many times a second (a client retrying, an
//! accept loop out of files) are told once a minute.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::lock;

/// How often the same error is logged again.
const RELOG_AFTER: Duration = Duration::from_secs(60);

/// Texts remembered before those older than [`RELOG_AFTER`] are forgotten.
const REMEMBERED: usize = 256;

/// Each distinct error or log line is logged once a minute at most.
#[derive(Default)]
pub struct LogThrottle {
    /// When each text was last logged.
    logged: Mutex<HashMap<String, Instant>>,
}

impl LogThrottle {
    /// Whether `text` is worth a log line: not logged in the last minute.
    pub fn worth_logging(&self, text: &str) -> bool {
        let mut logged = lock(&self.logged);
        match logged.get(text) {
            Some(at) if at.elapsed() < RELOG_AFTER => false,
            _ => {
                // Log lines name offsets and times: texts seen once are many.
                if logged.len() >= REMEMBERED {
                    logged.retain(|_, at| at.elapsed() < RELOG_AFTER);
                }
                logged.insert(text.to_owned(), Instant::now());
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
