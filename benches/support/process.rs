//! CPU time of a process, from /proc, for the benchmarks.

/// User and system CPU time `pid` used so far, in clock ticks, over all its
/// threads; zero for a process that is gone.
pub fn cpu_ticks(pid: u32) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name, which is in parentheses: utime and
    // stime, fields 14 and 15 of the line, are the 11th and 12th of these.
    let fields: Vec<u64> = stat
        .rsplit_once(')')
        .map(|(_, rest)| {
            rest.split_whitespace()
                .filter_map(|f| f.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let field = |i: usize| fields.get(i).copied().unwrap_or(0);
    (field(10), field(11))
}
