//! CPU time of a process, from /proc, for the benchmarks.

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
