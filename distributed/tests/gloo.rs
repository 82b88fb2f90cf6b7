//! Gloo across real processes on 127.0.0.1: the test executable (`harness = false`, see
//! tests/ranks/mod.rs) re-runs itself as each rank, told its role through environment
//! variables, and the parent checks every rank's exit status and report under a deadline,
//! killing what is left.

mod ranks;

use std::process::Command;
use std::time::{Duration, Instant};

use ddpm_c10d::{GlooConfig, ProcessGroup, Reduce};
use ranks::{line, wait_all, Proc};
use tch::{Kind, Tensor};

const CASE: &str = "DDPM_C10D_TEST_CASE";
const RANK: &str = "DDPM_C10D_TEST_RANK";
const WORLD: &str = "DDPM_C10D_TEST_WORLD";
const PORT: &str = "DDPM_C10D_TEST_PORT";
const TIMEOUT_MS: &str = "DDPM_C10D_TEST_TIMEOUT_MS";

fn main() -> std::process::ExitCode {
    ranks::main(
        CASE,
        rank_process,
        &[
            (
                "two_ranks_all_reduce_and_broadcast",
                two_ranks_all_reduce_and_broadcast,
            ),
            (
                "lone_rank_0_fails_after_its_timeout",
                lone_rank_0_fails_after_its_timeout,
            ),
            (
                "lone_rank_1_fails_after_its_timeout",
                lone_rank_1_fails_after_its_timeout,
            ),
        ],
    )
}

/// Runs `ranks` of a world of `world`; returns each one's (exit success, stdout + stderr), or
/// panics (after killing them all) if one is still running at `deadline`.
fn run(
    case: &str,
    ranks: &[usize],
    world: usize,
    timeout_ms: u64,
    deadline: Duration,
) -> Vec<(bool, String)> {
    let port = ranks::free_port();
    let procs = ranks
        .iter()
        .map(|&rank| {
            let mut cmd = Command::new(std::env::current_exe().expect("test executable"));
            cmd.env(CASE, case)
                .env(RANK, rank.to_string())
                .env(WORLD, world.to_string())
                .env(PORT, port.to_string())
                .env(TIMEOUT_MS, timeout_ms.to_string());
            Proc::spawn(cmd)
        })
        .collect();
    wait_all(&format!("case {case}"), procs, deadline)
        .into_iter()
        .map(|e| (e.success(), e.output))
        .collect()
}

fn env_usize(name: &str) -> usize {
    std::env::var(name).expect(name).parse().expect(name)
}

/// One rank, started by the tests below (this executable with CASE set).
fn rank_process(case: &str) {
    let (rank, world) = (env_usize(RANK), env_usize(WORLD));
    let config = GlooConfig {
        master_addr: "127.0.0.1".into(),
        master_port: u16::try_from(env_usize(PORT)).expect("port"),
        rank,
        world_size: world,
        timeout: Duration::from_millis(env_usize(TIMEOUT_MS) as u64),
        gloo_host: Some("127.0.0.1".into()),
        serve_store: true,
        store_prefix: String::new(),
    };
    let start = Instant::now();
    let group = match ProcessGroup::gloo(&config) {
        Ok(group) => group,
        Err(e) => {
            println!(
                "RESULT init-error after {} ms: {e}",
                start.elapsed().as_millis()
            );
            return;
        }
    };
    let r = rank as f32;
    match case {
        "collectives" => {
            // Sum: rank r holds [r + 1, 10 (r + 1), -r, 0.5]; the sum over 2 ranks is exact in f32.
            let mut t = Tensor::from_slice(&[r + 1.0, 10.0 * (r + 1.0), -r, 0.5]);
            group
                .all_reduce(&mut t, Reduce::Sum)
                .expect("all_reduce sum");
            println!("RESULT sum {:?}", Vec::<f32>::try_from(&t).expect("to vec"));
            let mut t = Tensor::from_slice(&[r + 1.0, 4.0 * r]).reshape([1, 2]);
            group
                .all_reduce(&mut t, Reduce::Average)
                .expect("all_reduce average");
            println!(
                "RESULT average {:?}",
                Vec::<f32>::try_from(&t.flatten(0, -1)).expect("to vec")
            );
            let mut t = Tensor::full([3], 7.0 + r as f64, (Kind::Double, tch::Device::Cpu));
            group.broadcast(&mut t, 0).expect("broadcast");
            println!(
                "RESULT broadcast {:?}",
                Vec::<f64>::try_from(&t).expect("to vec")
            );
            group.barrier().expect("barrier");
            let strided = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0])
                .reshape([2, 2])
                .transpose(0, 1);
            let mut strided = strided.shallow_clone();
            let e = group
                .all_reduce(&mut strided, Reduce::Sum)
                .expect_err("non-contiguous refused");
            println!("RESULT strided-error {e}");
            println!("RESULT done");
        }
        other => panic!("unknown case {other}"),
    }
}

fn two_ranks_all_reduce_and_broadcast() {
    let results = run("collectives", &[0, 1], 2, 10_000, Duration::from_secs(60));
    for (rank, (ok, out)) in results.iter().enumerate() {
        assert!(ok, "rank {rank} failed:\n{out}");
        assert_eq!(
            line(out, "RESULT sum "),
            "[3.0, 30.0, -1.0, 1.0]",
            "rank {rank}"
        );
        // [(1 + 2) / 2, (0 + 4) / 2]
        assert_eq!(line(out, "RESULT average "), "[1.5, 2.0]", "rank {rank}");
        assert_eq!(
            line(out, "RESULT broadcast "),
            "[7.0, 7.0, 7.0]",
            "rank {rank}"
        );
        assert!(
            line(out, "RESULT strided-error ").contains("contiguous"),
            "rank {rank}"
        );
        assert!(out.contains("RESULT done"), "rank {rank}:\n{out}");
    }
}

/// A rank whose peer never comes: an error from init once the timeout has passed, no hang, no
/// panic (the process exits cleanly after printing it).
fn lone(rank: usize) {
    let results = run("collectives", &[rank], 2, 2_000, Duration::from_secs(30));
    let (ok, out) = &results[0];
    assert!(ok, "lone rank {rank} did not exit cleanly:\n{out}");
    let err = line(out, "RESULT init-error after ");
    let ms: u128 = err
        .split(' ')
        .next()
        .and_then(|m| m.parse().ok())
        .expect("elapsed ms");
    assert!(
        ms >= 1_900,
        "lone rank {rank} gave up before its 2 s timeout: {err}"
    );
    assert!(err.contains("c10d init failed"), "{err}");
}

fn lone_rank_0_fails_after_its_timeout() {
    lone(0);
}

fn lone_rank_1_fails_after_its_timeout() {
    lone(1);
}
