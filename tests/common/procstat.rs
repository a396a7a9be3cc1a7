//! What `/proc` says about a process: open descriptors, threads, nice values
//! and CPU time, and a CPU-share check that holds on a loaded machine.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// Entries of `/proc/<pid>/<dir>` (`fd`, `task`); 0 if the process is gone.
fn proc_entries(pid: u32, dir: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/{dir}"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Open file descriptors of a process, from `/proc/<pid>/fd`.
pub fn proc_fd_count(pid: u32) -> usize {
    proc_entries(pid, "fd")
}

/// Threads of a process, from `/proc/<pid>/task`.
pub fn proc_thread_count(pid: u32) -> usize {
    proc_entries(pid, "task")
}

/// The fields of a /proc stat file after the parenthesised command name: the
/// first of them is field 3 of proc(5).
pub fn stat_fields(path: &str) -> Vec<String> {
    let stat = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    let after = &stat[stat.rfind(')').expect("comm") + 2..];
    after.split_whitespace().map(str::to_string).collect()
}

/// user + system CPU time of a process (`/proc/<pid>/stat`) or of one thread
/// (`/proc/self/task/<tid>/stat`), in clock ticks.
pub fn cpu_ticks_of(stat_path: &str) -> u64 {
    // utime and stime are fields 14 and 15.
    let fields = stat_fields(stat_path);
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

/// user + system CPU time of a process, in clock ticks.
pub fn cpu_ticks(pid: u32) -> u64 {
    cpu_ticks_of(&format!("/proc/{pid}/stat"))
}

/// Each thread's name and nice value (field 19), sorted by name.
pub fn thread_nice_values(pid: u32) -> Vec<(String, i64)> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("read /proc/pid/task") {
        let task = task.expect("task entry").path();
        let name = std::fs::read_to_string(task.join("comm")).expect("read comm");
        let fields = stat_fields(&task.join("stat").to_string_lossy());
        threads.push((name.trim().to_string(), fields[16].parse().expect("nice")));
    }
    threads.sort();
    threads
}

/// The CPU time `pid` used while a busy loop in this test process used
/// `busy_ticks` clock ticks, as a fraction of the busy loop's.
///
/// A busy loop gets whatever CPU share the machine can give right now, so the
/// ratio says "is `pid` spinning?" the same way on an idle laptop and on a
/// loaded 2-core CI machine: a process that spins competes like the busy loop
/// and gets a comparable share (a ratio near 1), an idle one gets close to 0.
/// Measuring until the busy loop has had `busy_ticks` (rather than for a fixed
/// wall-clock window) keeps the resolution the same however loaded the machine
/// is; `deadline` bounds the wait if the busy loop gets no CPU at all.
#[track_caller]
pub fn cpu_share_against_busy_loop(pid: u32, busy_ticks: u64, deadline: Duration) -> f64 {
    let running = Arc::new(AtomicBool::new(true));
    let spinner = {
        let running = running.clone();
        thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() };
            let stat = format!("/proc/self/task/{tid}/stat");
            let start = cpu_ticks_of(&stat);
            let mut spins = 0u64;
            while running.load(Ordering::Relaxed) {
                spins = std::hint::black_box(spins.wrapping_add(1));
                if spins.is_multiple_of(1 << 20) && cpu_ticks_of(&stat) - start >= busy_ticks {
                    break;
                }
            }
            cpu_ticks_of(&stat) - start
        })
    };
    let before = cpu_ticks(pid);
    let until = Instant::now() + deadline;
    while !spinner.is_finished() && Instant::now() < until {
        thread::sleep(Duration::from_millis(20));
    }
    running.store(false, Ordering::Relaxed);
    let used = cpu_ticks(pid) - before;
    let busy = spinner.join().expect("busy-loop thread");
    assert!(
        busy > 0,
        "the busy loop got no CPU within {deadline:?}: cannot compare"
    );
    used as f64 / busy as f64
}
