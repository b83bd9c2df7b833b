//! The process's open-files limit. Raised at start to the most the system
//! allows (a shell's soft limit is often 1024, less than a busy server needs),
//! then shared out: HTTP clients may hold all but the files the service keeps
//! for its own PostgreSQL sessions, Kafka and Redis connections and runtimes,
//! so a crowd of clients cannot leave ingest unable to reconnect.

use rlimit::Resource;

/// Files kept beside the PostgreSQL pool: each Kafka client's sockets and
/// wake-up pipes per broker, Redis, the runtimes' event queues, the log.
const KEPT: u64 = 256;

/// Connections clients may hold by default whatever the limit: a raised limit
/// is often a million, and each connection holds buffers (some 20 KiB idle),
/// so memory would become the bound instead.
const MOST_CONNECTIONS: usize = 16_384;

/// The soft limit before and after raising it to the hard limit.
pub fn raise_limit() -> std::io::Result<(u64, u64)> {
    let (before, _) = Resource::NOFILE.get()?;
    let now = rlimit::increase_nofile_limit(u64::MAX)?;
    Ok((before, now))
}

/// The files HTTP clients may hold out of `limit` when the pool has
/// `sessions`: all but what the service keeps, at least half.
pub fn clients_files(limit: u64, sessions: u32) -> u64 {
    limit - (KEPT + u64::from(sessions)).min(limit / 2)
}

/// The connections HTTP clients may hold by default: their files, at most
/// [`MOST_CONNECTIONS`].
pub fn http_share(limit: u64, sessions: u32) -> usize {
    usize::try_from(clients_files(limit, sessions))
        .map_or(MOST_CONNECTIONS, |share| share.min(MOST_CONNECTIONS))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_get_what_the_service_does_not_keep() {
        assert_eq!(http_share(1024, 8), 760);
        assert_eq!(http_share(16_384 + 264, 8), 16_384);
        assert_eq!(http_share(1_048_576, 8), 16_384);
        // A small limit is split in two.
        assert_eq!(http_share(256, 8), 128);
        assert_eq!(clients_files(1_048_576, 8), 1_048_312);
    }

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one() {
        let (before, now) = raise_limit().unwrap();
        let (soft, hard) = Resource::NOFILE.get().unwrap();
        assert!(now >= before);
        assert_eq!((now, soft), (hard, hard));
    }
}
