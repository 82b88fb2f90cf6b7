//! Shared by the test executables that start rank processes (distributed/tests/gloo.rs and
//! accelerated/tests/distributed.rs, which includes this file by path): a small test harness
//! (the executables are `harness = false`, so a rank process is the same executable started
//! with its role in the environment, and nothing reports "ok" without having run), and the
//! loop that waits for a set of processes under a deadline.
// Each executable uses only some of these helpers.
#![allow(dead_code)]

use std::io::Read;
use std::net::TcpListener;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A test: its name and body (a panic fails it).
pub type Test = (&'static str, fn());

/// The executable's `main`: with `role` set in the environment, runs `rank` with its value (a
/// rank process); otherwise runs the tests chosen by libtest's arguments, one after the other,
/// as `test NAME ... ok` / `FAILED` and libtest's `test result:` line, and returns a failing
/// exit code if one failed. Understood: name filters (substrings; `--exact`: whole names),
/// `--skip NAME`, `--list`, and `--ignored` (runs none: nothing here is ignored);
/// `--include-ignored`, `--nocapture` and the other flags change nothing.
pub fn main(role: &str, rank: fn(&str), tests: &[Test]) -> ExitCode {
    if let Ok(value) = std::env::var(role) {
        rank(&value);
        return ExitCode::SUCCESS;
    }
    // libtest's options that take a value as the next argument.
    const VALUED: [&str; 7] = [
        "--test-threads",
        "--skip",
        "--format",
        "--color",
        "--logfile",
        "--shuffle-seed",
        "-Z",
    ];
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mut filters, mut skips) = (Vec::new(), Vec::new());
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        if VALUED.contains(&a.as_str()) {
            if a == "--skip" {
                skips.extend(args.get(i + 1).cloned());
            }
            i += 2;
            continue;
        }
        if !a.starts_with('-') {
            filters.push(a.clone());
        }
        i += 1;
    }
    let flag = |f: &str| args.iter().any(|a| a == f);
    let exact = flag("--exact");
    let chosen: Vec<&Test> = tests
        .iter()
        .filter(|(name, _)| {
            let hit = |f: &String| {
                if exact {
                    name == f
                } else {
                    name.contains(f.as_str())
                }
            };
            (filters.is_empty() || filters.iter().any(hit)) && !skips.iter().any(hit)
        })
        .filter(|_| !flag("--ignored"))
        .collect();
    if flag("--list") {
        for (name, _) in &chosen {
            println!("{name}: test");
        }
        return ExitCode::SUCCESS;
    }
    println!("\nrunning {} tests", chosen.len());
    let mut failed = Vec::new();
    let start = Instant::now();
    for (name, body) in &chosen {
        let t = Instant::now();
        let ok = catch_unwind(AssertUnwindSafe(body)).is_ok();
        println!(
            "test {name} ... {} ({:.1} s)",
            if ok { "ok" } else { "FAILED" },
            t.elapsed().as_secs_f64()
        );
        if !ok {
            failed.push(*name);
        }
    }
    if !failed.is_empty() {
        println!("\nfailures:\n    {}", failed.join("\n    "));
    }
    println!(
        "\ntest result: {}. {} passed; {} failed; 0 ignored; 0 measured; {} filtered out; finished in {:.2}s\n",
        if failed.is_empty() { "ok" } else { "FAILED" },
        chosen.len() - failed.len(),
        failed.len(),
        tests.len() - chosen.len(),
        start.elapsed().as_secs_f64()
    );
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(101)
    }
}

/// A port the kernel just gave a listener (free now; the ranks bind it a moment later).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port on 127.0.0.1")
        .port()
}

/// A started process whose stdout and stderr are read as they come (so that a chatty one
/// never blocks on a full pipe).
pub struct Proc {
    pub child: Child,
    out: Option<JoinHandle<String>>,
    err: Option<JoinHandle<String>>,
}

fn drain(pipe: Option<impl Read + Send + 'static>) -> Option<JoinHandle<String>> {
    pipe.map(|mut p| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = p.read_to_end(&mut bytes);
            String::from_utf8_lossy(&bytes).into_owned()
        })
    })
}

impl Proc {
    /// Starts `cmd` with piped stdout and stderr.
    pub fn spawn(mut cmd: Command) -> Proc {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let out = drain(child.stdout.take());
        let err = drain(child.stderr.take());
        Proc { child, out, err }
    }

    /// Its stdout then its stderr, once it has ended.
    fn output(&mut self) -> String {
        let take = |h: &mut Option<JoinHandle<String>>| {
            h.take()
                .map(|h| h.join().unwrap_or_default())
                .unwrap_or_default()
        };
        take(&mut self.out) + &take(&mut self.err)
    }
}

/// What a process did: its exit status, how long after the wait began it ended, its output.
#[derive(Debug)]
pub struct Ended {
    pub status: ExitStatus,
    pub after: Duration,
    pub output: String,
}

impl Ended {
    pub fn success(&self) -> bool {
        self.status.success()
    }
}

/// Waits for every process; past `deadline` kills them all and panics (naming `what`).
pub fn wait_all(what: &str, mut procs: Vec<Proc>, deadline: Duration) -> Vec<Ended> {
    let start = Instant::now();
    let mut ended: Vec<Option<(ExitStatus, Duration)>> = vec![None; procs.len()];
    while ended.iter().any(Option::is_none) {
        for (p, e) in procs.iter_mut().zip(ended.iter_mut()) {
            if e.is_none() {
                if let Some(status) = p.child.try_wait().expect("try_wait") {
                    *e = Some((status, start.elapsed()));
                }
            }
        }
        if start.elapsed() > deadline {
            let mut text = String::new();
            for p in &mut procs {
                let _ = p.child.kill();
                let _ = p.child.wait();
                text += &p.output();
            }
            panic!("{what}: still running after {deadline:?}; their output:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    procs
        .iter_mut()
        .zip(ended)
        .map(|(p, e)| {
            let (status, after) = e.expect("ended");
            Ended {
                status,
                after,
                output: p.output(),
            }
        })
        .collect()
}

/// The rest of the first line holding `prefix`, after it.
pub fn line<'a>(out: &'a str, prefix: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.find(prefix).map(|i| &l[i + prefix.len()..]))
        .unwrap_or_else(|| panic!("no `{prefix}` line in:\n{out}"))
}
