//! What Linux's /proc says about this process, for `/metrics`: CPU time,
//! memory, start time and file descriptors, the figures behind the standard
//! `process_*` metrics of the Prometheus clients.
//!
//! Read on the event loop, through `metrics::ProcessSampler`, at most once a
//! second. Each figure is `None` where /proc is not there (not Linux, or not
//! mounted), and the metric is then left out rather than reported as 0.

use std::sync::OnceLock;

/// From /proc/self/stat: the fields the standard process metrics need.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stat {
    /// User plus system CPU time (utime + stime), in seconds.
    pub cpu_seconds: f64,
    /// When the process started, in clock ticks after boot (starttime).
    pub start_ticks: u64,
    /// Virtual memory size in bytes (vsize).
    pub virtual_bytes: u64,
    /// Resident set size in bytes (rss, in pages, times the page size).
    pub resident_bytes: u64,
}

/// This process's /proc/self/stat, read now.
pub fn stat() -> Option<Stat> {
    let text = std::fs::read_to_string("/proc/self/stat").ok()?;
    parse_stat(&text, clock_ticks_per_second()?, page_size()?)
}

/// Parses a /proc/<pid>/stat line (proc(5)). The command name (field 2) is in
/// parentheses and may itself hold spaces and parentheses, so the fields are
/// counted from the last `)`.
fn parse_stat(text: &str, ticks_per_second: u64, page_size: u64) -> Option<Stat> {
    let after_comm = text.get(text.rfind(')')? + 1..)?;
    // fields[0] is field 3 (state), so field N is fields[N - 3].
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
    let (utime, stime) = (field(14)?, field(15)?);
    Some(Stat {
        cpu_seconds: (utime + stime) as f64 / ticks_per_second as f64,
        start_ticks: field(22)?,
        virtual_bytes: field(23)?,
        resident_bytes: field(24)?.saturating_mul(page_size),
    })
}

/// When this process started, in seconds since the Unix epoch: the boot time
/// (`btime` of /proc/stat) plus the start tick of /proc/self/stat, as the
/// Prometheus clients compute it. Read once: it never changes.
pub fn start_time_seconds() -> Option<f64> {
    static START: OnceLock<Option<f64>> = OnceLock::new();
    *START.get_or_init(|| {
        let proc_stat = std::fs::read_to_string("/proc/stat").ok()?;
        let boot = boot_time_seconds(&proc_stat)?;
        let ticks = stat()?.start_ticks;
        Some(boot as f64 + ticks as f64 / clock_ticks_per_second()? as f64)
    })
}

/// The `btime` line of /proc/stat: boot time in seconds since the epoch.
fn boot_time_seconds(proc_stat: &str) -> Option<u64> {
    proc_stat
        .lines()
        .find_map(|line| line.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

/// Entries of /proc/self/fd (minus the one the listing itself holds open).
/// About a microsecond per descriptor: sample it, do not call it per request.
pub fn open_fds() -> Option<u64> {
    let count = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
    Some(count.saturating_sub(1))
}

/// The soft open-file limit (what `accept` runs into), as the Prometheus
/// clients report it from /proc/self/limits.
pub fn max_fds() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return None;
    }
    // RLIM_INFINITY is not a count; leave the metric out.
    (limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur)
}

/// USER_HZ, the unit of the CPU and start times in /proc (100 on Linux).
fn clock_ticks_per_second() -> Option<u64> {
    // SAFETY: sysconf has no memory-safety preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(ticks).ok().filter(|t| *t > 0)
}

fn page_size() -> Option<u64> {
    // SAFETY: sysconf has no memory-safety preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).ok().filter(|s| *s > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_last_parenthesis() {
        // A command name with spaces and a ')' must not shift the fields.
        let line = "4242 (evil) name (x) S 1 4242 4242 0 -1 4194560 900 0 0 0 \
                    250 130 0 0 20 0 3 0 123456 104857600 2560 18446744073709551615 \
                    1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 0 0\n";
        let stat = parse_stat(line, 100, 4096).expect("parses");
        assert_eq!(
            stat,
            Stat {
                cpu_seconds: 3.8,
                start_ticks: 123_456,
                virtual_bytes: 104_857_600,
                resident_bytes: 2560 * 4096,
            }
        );
        assert_eq!(parse_stat("4242 (truncated) S 1 2", 100, 4096), None);
        assert_eq!(parse_stat("no parenthesis", 100, 4096), None);
    }

    #[test]
    fn boot_time_is_the_btime_line() {
        let proc_stat = "cpu  1 2 3\nintr 5 6\nctxt 7\nbtime 1764633600\nprocesses 9\n";
        assert_eq!(boot_time_seconds(proc_stat), Some(1_764_633_600));
        assert_eq!(boot_time_seconds("cpu 1 2 3\n"), None);
    }

    #[test]
    fn this_process_has_sane_figures() {
        let stat = stat().expect("/proc/self/stat");
        assert!(stat.resident_bytes > 0 && stat.virtual_bytes >= stat.resident_bytes);
        let started = start_time_seconds().expect("start time");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs_f64();
        // The test binary started at most an hour ago (btime is whole seconds).
        assert!(
            started <= now + 1.0 && started > now - 3600.0,
            "{started} vs {now}"
        );
        let open = open_fds().expect("/proc/self/fd");
        assert!(open > 0 && max_fds().expect("getrlimit") >= open);
    }
}
