//! CPU accounting from /proc: where the time of a measurement went
//! (clamd, avgate, this client) and how much other processes took, which
//! on a small machine is the first thing to rule out before reading a ratio.

use std::time::Instant;

/// Linux reports process and system times in USER_HZ, which is 100 on
/// every architecture's user-space ABI.
const TICKS_PER_SEC: f64 = 100.0;

/// The processes whose CPU time is tracked.
#[derive(Debug, Clone, Copy, Default)]
pub struct Pids {
    pub clamd: Option<u32>,
    pub avgate: Option<u32>,
}

#[derive(Debug, Clone, Copy)]
pub struct Snapshot {
    at: Instant,
    clamd: u64,
    avgate: u64,
    client: u64,
    /// Busy ticks of the whole machine (all CPUs).
    busy: u64,
}

/// CPU seconds used between two snapshots.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    pub wall: f64,
    pub clamd: f64,
    pub avgate: f64,
    pub client: f64,
    /// Everything else on the machine (builds, other tests...).
    pub others: f64,
}

impl Usage {
    pub fn add(&mut self, other: Usage) {
        self.wall += other.wall;
        self.clamd += other.clamd;
        self.avgate += other.avgate;
        self.client += other.client;
        self.others += other.others;
    }

    /// Share of the machine's CPUs taken by other processes, in percent.
    pub fn others_percent(&self) -> f64 {
        100.0 * self.others / (self.wall * cpus() as f64).max(1e-9)
    }
}

pub fn snapshot(pids: Pids) -> Snapshot {
    Snapshot {
        at: Instant::now(),
        clamd: pids.clamd.map(process_ticks).unwrap_or(0),
        avgate: pids.avgate.map(process_ticks).unwrap_or(0),
        client: process_ticks(std::process::id()),
        busy: machine_busy_ticks(),
    }
}

pub fn since(before: Snapshot, pids: Pids) -> Usage {
    let after = snapshot(pids);
    let secs = |a: u64, b: u64| a.saturating_sub(b) as f64 / TICKS_PER_SEC;
    let clamd = secs(after.clamd, before.clamd);
    let avgate = secs(after.avgate, before.avgate);
    let client = secs(after.client, before.client);
    let busy = secs(after.busy, before.busy);
    Usage {
        wall: after.at.duration_since(before.at).as_secs_f64(),
        clamd,
        avgate,
        client,
        others: (busy - clamd - avgate - client).max(0.0),
    }
}

pub fn cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// utime + stime of a process (all its threads), in ticks.
fn process_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // The command name is in parentheses and may contain spaces: fields
    // are counted from the last ')'. utime and stime are fields 14 and 15.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    field(14).unwrap_or(0) + field(15).unwrap_or(0)
}

/// Non-idle ticks of all CPUs together (first line of /proc/stat).
fn machine_busy_ticks() -> u64 {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return 0;
    };
    let Some(line) = stat.lines().next() else {
        return 0;
    };
    // cpu user nice system idle iowait irq softirq steal guest guest_nice
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 8 {
        return 0;
    }
    // Busy: everything but idle and iowait; guest time is already in user.
    v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_our_own_cpu_time() {
        let pids = Pids::default();
        let before = snapshot(pids);
        let mut x = 0u64;
        let start = Instant::now();
        while start.elapsed().as_millis() < 100 {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        let used = since(before, pids);
        assert!(x > 0);
        assert!(used.client > 0.0, "{used:?}");
        assert!(used.wall >= 0.1);
    }
}
