//! The library's distributed plumbing across real processes on 127.0.0.1 (issue 16): this test
//! executable re-runs itself as each rank (the ignored `rank_process` test, given its launch
//! through torchrun's variables), the parent bounds them in time and reads their reports.
#![cfg(feature = "distributed")]

mod common;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ddpm::distributed::{Launch, ProcessGroup};
use ddpm::error::DdpmError;
use tch::{Kind, Tensor};

const CASE: &str = "DDPM_DIST_TEST_CASE";

fn spawn(case: &str, rank: usize, world: usize, port: u16) -> Child {
    Command::new(std::env::current_exe().expect("test executable"))
        .args(["--exact", "rank_process", "--ignored", "--nocapture"])
        .env(CASE, case)
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("OMP_NUM_THREADS", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn a rank")
}

/// Each rank's (success, stdout + stderr); kills them all and panics past `deadline`.
fn run(case: &str, ranks: &[usize], world: usize, deadline: Duration) -> Vec<(bool, String)> {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let mut children: Vec<Child> = ranks.iter().map(|&r| spawn(case, r, world, port)).collect();
    let start = Instant::now();
    while children
        .iter_mut()
        .any(|c| c.try_wait().expect("try_wait").is_none())
    {
        if start.elapsed() > deadline {
            for child in &mut children {
                let _ = child.kill();
                let _ = child.wait();
            }
            panic!("case {case}: ranks still running after {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    children
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().expect("output");
            let text = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            (out.status.success(), text)
        })
        .collect()
}

fn report<'a>(out: &'a str, prefix: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.find(prefix).map(|i| &l[i + prefix.len()..]))
        .unwrap_or_else(|| panic!("no `{prefix}` in:\n{out}"))
}

fn values(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(&t.flatten(0, -1)).expect("to vec")
}

/// One rank, when spawned by the tests below; nothing otherwise.
#[test]
#[ignore = "a rank process, started by the other tests"]
fn rank_process() {
    let Ok(case) = std::env::var(CASE) else {
        return;
    };
    let launch = Launch::from_env()
        .expect("launch")
        .expect("torchrun variables");
    let timeout = Duration::from_secs(if case == "lone" { 2 } else { 20 });
    let group = match ProcessGroup::join(&launch, timeout) {
        Ok(group) => group,
        Err(e) => {
            let named = matches!(e, DdpmError::Distributed { rank, .. } if rank == launch.rank);
            println!("REPORT join-error (names rank: {named}): {e}");
            return;
        }
    };
    // Rank r's loss: (r + 1) (Σ a + Σ b²), with a = 0 (2×3) and b = [1, 2, 3, 4]; c is unused.
    // Gradients: a: r + 1; b: 2 b (r + 1); their average over 2 ranks: 1.5 and 3 b, exact in f32.
    let r = launch.rank as f64;
    let a = Tensor::zeros([2, 3], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
    let b = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]).set_requires_grad(true);
    let c = Tensor::ones([3], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
    let loss = (a.sum(Kind::Float) + (&b * &b).sum(Kind::Float)) * (r + 1.0);
    loss.backward();
    let params = [a.shallow_clone(), b.shallow_clone(), c.shallow_clone()];
    group.average_gradients(&params).expect("average_gradients");
    println!("REPORT a {:?}", values(&a.grad()));
    println!("REPORT b {:?}", values(&b.grad()));
    println!("REPORT c defined {}", c.grad().defined());
    let mut t = Tensor::from_slice(&[10.0f32 + launch.rank as f32]);
    group.broadcast_from_0(&mut t).expect("broadcast");
    group.barrier().expect("barrier");
    println!("REPORT broadcast {:?}", values(&t));
}

#[test]
fn two_ranks_average_their_gradients_in_one_buffer() {
    let results = run("grads", &[0, 1], 2, Duration::from_secs(60));
    for (rank, (ok, out)) in results.iter().enumerate() {
        assert!(ok, "rank {rank}:\n{out}");
        assert_eq!(
            report(out, "REPORT a "),
            "[1.5, 1.5, 1.5, 1.5, 1.5, 1.5]",
            "rank {rank}"
        );
        assert_eq!(
            report(out, "REPORT b "),
            "[3.0, 6.0, 9.0, 12.0]",
            "rank {rank}"
        );
        assert_eq!(report(out, "REPORT c defined "), "false", "rank {rank}");
        assert_eq!(report(out, "REPORT broadcast "), "[10.0]", "rank {rank}");
    }
}

#[test]
fn a_rank_without_its_peer_fails_naming_itself() {
    let results = run("lone", &[1], 2, Duration::from_secs(30));
    let (ok, out) = &results[0];
    assert!(ok, "the lone rank did not exit cleanly:\n{out}");
    let err = report(out, "REPORT join-error ");
    assert!(
        err.starts_with("(names rank: true): rank 1 of 2: init failed"),
        "{err}"
    );
}

#[test]
fn ddpm_info_lists_the_built_in_backends() {
    let out = common::ddpm().arg("info").output().expect("run ddpm info");
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("distributed backends: gloo\n"), "{stdout}");
}
