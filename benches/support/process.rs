//! CPU time and memory of a process, from /proc, for the benchmarks.

/// User and system CPU time `pid` used so far, in clock ticks, over all its
/// threads; zero for a process that is gone.
pub fn cpu_ticks(pid: u32) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name, which is in parentheses, start with
    // the state (field 3); utime and stime are fields 14 and 15. Some fields
    // before them are not numbers (the state) or negative (tpgid), so they
    // are counted by position, not filtered.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse().ok()).unwrap_or(0);
    (field(14), field(15))
}

/// Clock ticks per second of [`cpu_ticks`] (`getconf CLK_TCK`; 100 on Linux).
pub fn ticks_per_second() -> f64 {
    static TICKS_PER_SECOND: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS_PER_SECOND.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// A memory figure of `pid` from /proc/PID/status (`VmRSS`: resident now,
/// `VmHWM`: resident at its peak), in bytes; zero for a process that is gone.
pub fn memory_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    kib * 1024
}
