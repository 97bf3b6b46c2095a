//! What Linux's /proc says about a process: memory, threads, CPU time, pending signals and
//! listening sockets. The one place the tests read /proc.

use std::time::Duration;

use super::poll_until;

/// The text of /proc/PID/status.
fn status(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"))
}

/// A number field of /proc/PID/status (`VmRSS:`, `VmHWM:` in KiB, `Threads:`).
fn status_number(pid: u32, field: &str) -> u64 {
    let status = status(pid);
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status:\n{status}"))
}

/// Resident memory now, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    status_number(pid, "VmRSS:")
}

/// Peak resident memory over the process's life, in KiB.
pub fn peak_rss_kib(pid: u32) -> u64 {
    status_number(pid, "VmHWM:")
}

/// Number of threads.
pub fn threads(pid: u32) -> u64 {
    status_number(pid, "Threads:")
}

/// A thread count that holds steady for five readings 20 ms apart (the server may still be
/// finishing start-up when it logs `listening on`); after 5 s without that, the last reading.
pub fn steady_threads(pid: u32) -> u64 {
    let mut last = threads(pid);
    let mut steady = 0;
    poll_until(Duration::from_secs(5), Duration::from_millis(20), || {
        let now = threads(pid);
        if now == last {
            steady += 1;
        } else {
            steady = 0;
            last = now;
        }
        (steady >= 5).then_some(now)
    })
    .unwrap_or(last)
}

/// CPU time used so far, user plus system, in clock ticks (utime + stime of /proc/PID/stat).
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/stat: {e}"));
    // Fields after the `(comm)`: state is field 3, utime 14, stime 15 (1-based).
    let after = &stat[stat.rfind(')').expect("comm in stat") + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: u64 = fields[11].parse().expect("utime");
    let stime: u64 = fields[12].parse().expect("stime");
    utime + stime
}

/// Whether a signal sent to the process as a whole is still pending (`ShdPnd:` is not all
/// zeros); `None` if the process is gone.
pub fn signal_pending(pid: u32) -> Option<bool> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let pending = status.lines().find_map(|l| l.strip_prefix("ShdPnd:"))?;
    Some(!pending.trim().trim_start_matches('0').is_empty())
}

/// The port a process listens on, from /proc (for a server whose log can't be read).
pub fn listening_port(pid: u32) -> Option<u16> {
    let mut sockets = Vec::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()? {
        let link = std::fs::read_link(fd.ok()?.path()).ok()?;
        if let Some(inode) = link
            .to_str()
            .and_then(|l| l.strip_prefix("socket:["))
            .and_then(|l| l.strip_suffix(']'))
        {
            sockets.push(inode.to_string());
        }
    }
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // local_address, rem_address, st (0A: LISTEN), ..., inode (the tenth field).
            if fields.len() > 9 && fields[3] == "0A" && sockets.iter().any(|s| s == fields[9]) {
                let port = fields[1].rsplit(':').next()?;
                return u16::from_str_radix(port, 16).ok();
            }
        }
    }
    None
}
