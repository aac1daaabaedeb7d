//! What the benches share: running this bench binary as child processes and taking medians,
//! and reading the process's memory figures.

use std::process::Command;

/// A `kB` field of `/proc/self/status` (`VmHWM`: peak resident, `VmRSS`: resident now).
pub fn status_kib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0.0)
}

/// The median (the upper one of an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs this bench binary `reps` times with `args`; each run prints numbers separated by
/// whitespace. Returns the median of each number over the runs.
pub fn children(reps: usize, args: &[String]) -> Vec<f64> {
    let exe = std::env::current_exe().expect("the bench binary");
    let mut runs: Vec<Vec<f64>> = Vec::new();
    for _ in 0..reps {
        let out = Command::new(&exe).args(args).output().expect("run a child");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        runs.push(
            text.split_whitespace()
                .map(|x| x.parse().expect("a number"))
                .collect(),
        );
    }
    (0..runs[0].len())
        .map(|k| median(runs.iter().map(|r| r[k]).collect()))
        .collect()
}
