//! A minimal test runner for test targets built with `harness = false`.
//!
//! Such a target owns its `main`, which lets it do something other than run tests when
//! asked (the kill test re-executes itself as the stress writer it kills). It still has
//! to behave like a test binary towards `cargo test`: take name filters, accept and
//! ignore the options cargo passes to every test binary (`--nocapture`, `--quiet`,
//! `--test-threads N`, ...), report each test, and exit non-zero when one fails.
//! Listing (`--list`, `--format terse`) follows libtest's output, so that other runners
//! can enumerate the tests.

use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Instant;

/// A test: a name, and a function that panics to fail.
#[derive(Clone, Copy, Debug)]
pub struct Test {
    /// The name filters match and reports print.
    pub name: &'static str,
    /// The test itself.
    pub run: fn(),
}

/// Libtest's options that take a value: their value must not be read as a filter.
const TAKES_VALUE: &[&str] = &[
    "--test-threads",
    "--skip",
    "--logfile",
    "--color",
    "--format",
    "--shuffle-seed",
    "-Z",
];

/// The part of libtest's command line that decides what runs and how.
#[derive(Debug, Default, PartialEq, Eq)]
struct Selection {
    filters: Vec<String>,
    skips: Vec<String>,
    exact: bool,
    list: bool,
    terse: bool,
    /// `--ignored` or `--bench`: only tests of a kind this runner never has.
    none: bool,
    threads: Option<usize>,
}

impl Selection {
    fn parse(args: &[String]) -> Self {
        let mut sel = Self::default();
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
                _ => (arg.as_str(), None),
            };
            let value = if TAKES_VALUE.contains(&flag) {
                inline.or_else(|| args.next().cloned())
            } else {
                None
            };
            match flag {
                "--exact" => sel.exact = true,
                "--list" => sel.list = true,
                "--ignored" | "--bench" => sel.none = true,
                "--skip" => sel.skips.extend(value),
                "--format" => sel.terse = value.as_deref() == Some("terse"),
                "--test-threads" => sel.threads = value.and_then(|v| v.parse().ok()),
                f if f.starts_with('-') => {}
                _ => sel.filters.push(arg.clone()),
            }
        }
        sel
    }

    fn matches(&self, pattern: &str, name: &str) -> bool {
        if self.exact {
            name == pattern
        } else {
            name.contains(pattern)
        }
    }

    fn selects(&self, name: &str) -> bool {
        !self.none
            && (self.filters.is_empty() || self.filters.iter().any(|f| self.matches(f, name)))
            && !self.skips.iter().any(|s| self.matches(s, name))
    }

    /// As libtest: `--test-threads`, else `RUST_TEST_THREADS`, else one per CPU.
    fn threads(&self) -> usize {
        self.threads
            .or_else(|| std::env::var("RUST_TEST_THREADS").ok()?.parse().ok())
            .or_else(|| std::thread::available_parallelism().ok().map(Into::into))
            .unwrap_or(1)
            .max(1)
    }
}

/// Runs the `tests` that `args` (the command line after the program name) select, as
/// libtest would, up to `--test-threads` at a time; each runs on a thread named after
/// it, so that a panic names the failing test. Returns the code to exit with: success
/// when every test passed, 101 (libtest's) otherwise.
pub fn run(tests: &[Test], args: &[String]) -> ExitCode {
    let sel = Selection::parse(args);
    let chosen: Vec<Test> = tests
        .iter()
        .copied()
        .filter(|t| sel.selects(t.name))
        .collect();
    if sel.list {
        for t in &chosen {
            println!("{}: test", t.name);
        }
        if !sel.terse {
            println!("\n{}, 0 benchmarks", tests_counted(chosen.len()));
        }
        return ExitCode::SUCCESS;
    }
    let start = Instant::now();
    println!("\nrunning {}", tests_counted(chosen.len()));
    let failed = run_all(&chosen, sel.threads(), |name, passed| {
        println!("test {name} ... {}", if passed { "ok" } else { "FAILED" });
    });
    let filtered_out = tests.len() - chosen.len();
    if !failed.is_empty() {
        println!("\nfailures:");
        for name in &failed {
            println!("    {name}");
        }
    }
    println!(
        "\ntest result: {}. {} passed; {} failed; 0 ignored; 0 measured; {filtered_out} \
         filtered out; finished in {:.2}s\n",
        if failed.is_empty() { "ok" } else { "FAILED" },
        chosen.len() - failed.len(),
        failed.len(),
        start.elapsed().as_secs_f64()
    );
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(101)
    }
}

fn tests_counted(n: usize) -> String {
    format!("{n} test{}", if n == 1 { "" } else { "s" })
}

/// Runs `tests` on up to `threads` threads, handing each to `report` as it ends; returns
/// the names of those that failed.
fn run_all(
    tests: &[Test],
    threads: usize,
    mut report: impl FnMut(&'static str, bool),
) -> Vec<&'static str> {
    let next = AtomicUsize::new(0);
    let (done, results) = mpsc::channel();
    std::thread::scope(|s| {
        for _ in 0..threads.min(tests.len()) {
            let (next, done) = (&next, done.clone());
            s.spawn(move || {
                while let Some(t) = tests.get(next.fetch_add(1, Ordering::Relaxed)) {
                    let passed = std::thread::Builder::new()
                        .name(t.name.to_string())
                        .spawn(t.run)
                        .map(|h| h.join().is_ok())
                        .unwrap_or(false);
                    let _ = done.send((t.name, passed));
                }
            });
        }
        drop(done);
        let mut failed = Vec::new();
        for (name, passed) in results {
            report(name, passed);
            if !passed {
                failed.push(name);
            }
        }
        failed
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    fn names(sel: &Selection) -> Vec<&'static str> {
        ["kill_a", "kill_b", "other"]
            .into_iter()
            .filter(|n| sel.selects(n))
            .collect()
    }

    #[test]
    fn cargo_options_are_ignored() {
        let sel = Selection::parse(&args(
            "--nocapture --quiet -q --test-threads 2 --color=never",
        ));
        assert_eq!(sel.threads, Some(2));
        assert_eq!(names(&sel), ["kill_a", "kill_b", "other"]);
        let sel = Selection::parse(&args("--test-threads=3 --show-output"));
        assert_eq!(sel.threads, Some(3));
        assert_eq!(names(&sel), ["kill_a", "kill_b", "other"]);
    }

    #[test]
    fn filters_select() {
        assert_eq!(
            names(&Selection::parse(&args("kill"))),
            ["kill_a", "kill_b"]
        );
        assert_eq!(
            names(&Selection::parse(&args("_b other"))),
            ["kill_b", "other"]
        );
        assert_eq!(
            names(&Selection::parse(&args("--exact kill"))),
            Vec::<&str>::new()
        );
        assert_eq!(
            names(&Selection::parse(&args("--exact kill_a"))),
            ["kill_a"]
        );
        assert_eq!(
            names(&Selection::parse(&args("kill --skip _a"))),
            ["kill_b"]
        );
        assert_eq!(names(&Selection::parse(&args("--skip=kill"))), ["other"]);
        assert_eq!(
            names(&Selection::parse(&args("--ignored"))),
            Vec::<&str>::new()
        );
    }

    #[test]
    fn listing() {
        let sel = Selection::parse(&args("--list --format terse"));
        assert!(sel.list && sel.terse);
        assert!(sel.filters.is_empty());
    }

    #[test]
    fn failures_are_counted() {
        let tests = [
            Test {
                name: "passes",
                run: || {},
            },
            Test {
                name: "fails_on_purpose",
                run: || panic!("a test of the harness that must fail"),
            },
        ];
        let mut reported = Vec::new();
        let failed = run_all(&tests, 2, |name, passed| reported.push((name, passed)));
        assert_eq!(failed, ["fails_on_purpose"]);
        reported.sort();
        assert_eq!(reported, [("fails_on_purpose", false), ("passes", true)]);
        assert_eq!(run_all(&tests[..1], 1, |_, _| {}), Vec::<&str>::new());
    }
}
