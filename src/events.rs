//! What ingest tells the rest of the service: the orders it stores, as they
//! are stored, and how it is doing. Ingest writes both, HTTP reads both, and
//! neither knows the other; the app wires them up.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use serde_json::json;
use tokio::sync::broadcast;

use crate::domain::Order;
use crate::lock;

/// Summaries held for slow listeners; one that falls further behind skips ahead.
const BACKLOG: usize = 1024;

#[derive(Clone)]
pub struct Feed {
    sender: broadcast::Sender<Arc<str>>,
}

impl Default for Feed {
    fn default() -> Self {
        Self {
            sender: broadcast::channel(BACKLOG).0,
        }
    }
}

impl Feed {
    /// A listener that receives every summary published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<str>> {
        self.sender.subscribe()
    }

    /// Announces a newly stored order; costs nothing when nobody listens.
    pub fn publish(&self, order: &Order) {
        if self.sender.receiver_count() == 0 {
            return;
        }
        let o = order.document();
        let summary = json!({
            "order_uid": o.order_uid,
            "date_created": o.date_created,
            "customer_id": o.customer_id,
            "track_number": o.track_number,
            "amount": o.payment.amount,
            "currency": o.payment.currency,
            "item_count": o.items.len(),
        });
        let _ = self.sender.send(summary.to_string().into());
    }
}

/// How the broker fails to answer a request in time, with the problem told.
#[derive(Debug, Clone)]
pub enum BrokerTrouble {
    /// It answers late, or not at all over the connections it takes.
    Slow(String),
    /// No connection to it can be made.
    Unreachable(String),
}

impl BrokerTrouble {
    pub fn problem(&self) -> &str {
        match self {
            Self::Slow(problem) | Self::Unreachable(problem) => problem,
        }
    }
}

/// What readiness needs to know about ingest.
#[derive(Debug, Default)]
pub struct IngestHealth {
    /// The consumer has joined its group and received an assignment (possibly empty).
    pub assigned: AtomicBool,
    /// Some assigned partitions wait for their stored positions: ingest does
    /// not consume them yet.
    pub loading: AtomicBool,
    /// Why fetching is paused, while it is: the environment's fault, named.
    stalled: Mutex<Option<String>>,
    /// Partitions with messages no live member consumes, seen by an instance
    /// that holds none.
    orphaned: Mutex<Vec<i32>>,
    /// How the broker fails to answer in time, while it does.
    broker_trouble: Mutex<Option<BrokerTrouble>>,
    /// Why the broker turns this client away (sign-in, TLS), while it does.
    broker_refused: Mutex<Option<String>>,
    /// The orders topic, while the broker says it does not exist.
    missing_topic: Mutex<Option<String>>,
}

impl IngestHealth {
    /// The cause of the current pause, if ingest is paused.
    pub fn stalled(&self) -> Option<String> {
        lock(&self.stalled).clone()
    }

    pub(crate) fn set_stalled(&self, cause: Option<String>) {
        *lock(&self.stalled) = cause;
    }

    /// Partitions whose messages wait with no live consumer, if this
    /// instance holds no partition and sees any.
    pub fn orphaned(&self) -> Vec<i32> {
        lock(&self.orphaned).clone()
    }

    /// How the broker fails to answer in time, if it does.
    pub fn broker_trouble(&self) -> Option<BrokerTrouble> {
        lock(&self.broker_trouble).clone()
    }

    /// Stores the broker's verdict; true when it started, ended or changed kind.
    pub(crate) fn set_broker_trouble(&self, trouble: Option<BrokerTrouble>) -> bool {
        let mut held = lock(&self.broker_trouble);
        let kind = |t: &Option<BrokerTrouble>| t.as_ref().map(std::mem::discriminant);
        let changed = kind(&held) != kind(&trouble);
        *held = trouble;
        changed
    }

    /// Why the broker turns this client away, if it does.
    pub fn broker_refused(&self) -> Option<String> {
        lock(&self.broker_refused).clone()
    }

    /// Stores why the broker turns this client away; true when that started or ended.
    pub(crate) fn set_broker_refused(&self, reason: Option<String>) -> bool {
        replace(&self.broker_refused, reason)
    }

    /// The orders topic, if the broker says it does not exist.
    pub fn missing_topic(&self) -> Option<String> {
        lock(&self.missing_topic).clone()
    }

    /// Stores whether the orders topic is missing; true when that changed.
    pub(crate) fn set_missing_topic(&self, topic: Option<String>) -> bool {
        replace(&self.missing_topic, topic)
    }

    /// Stores the orphaned partitions; true when they changed.
    pub(crate) fn set_orphaned(&self, partitions: Vec<i32>) -> bool {
        let mut orphaned = lock(&self.orphaned);
        let changed = *orphaned != partitions;
        *orphaned = partitions;
        changed
    }
}

/// Stores `value`; true when it went from none to some or back (the changes
/// worth a log line).
fn replace(slot: &Mutex<Option<String>>, value: Option<String>) -> bool {
    let mut held = lock(slot);
    let changed = held.is_some() != value.is_some();
    *held = value;
    changed
}
