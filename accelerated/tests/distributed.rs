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

fn spawn(case: &str, rank: usize, world: usize, port: u16, extra: &[(&str, String)]) -> Child {
    Command::new(std::env::current_exe().expect("test executable"))
        .envs(extra.iter().map(|(k, v)| (*k, v.as_str())))
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
    run_with(case, ranks, world, deadline, &[])
}

fn run_with(
    case: &str,
    ranks: &[usize],
    world: usize,
    deadline: Duration,
    extra: &[(&str, String)],
) -> Vec<(bool, String)> {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let mut children: Vec<Child> = ranks
        .iter()
        .map(|&r| spawn(case, r, world, port, extra))
        .collect();
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

/// 10 LAMB steps of a tiny U-Net (8×8 grey, 8·[1, 2], batch 4, dropout 0) on fixed pictures:
/// the whole batch, or with `group` this rank's shard of it; returns the weights by name.
fn train_10(group: Option<(ProcessGroup, usize, usize)>) -> Vec<(String, Tensor)> {
    use ddpm::config::{Config, DataSource};
    use ddpm::unet::UNetConfig;
    tch::set_num_threads(1);
    let mut cfg = Config::mnist();
    cfg.data.source = DataSource::Folder;
    cfg.model = UNetConfig {
        image_size: 8,
        base_channels: 8,
        channel_mults: vec![1, 2],
        groups: 4,
        dropout: 0.0,
        ..UNetConfig::mnist()
    };
    cfg.train.steps = 10;
    cfg.train.batch_size = 4;
    cfg.train.warmup_steps = 2;
    cfg.train.lr_decay = vec![];
    let n = 16;
    let i = Tensor::arange(n * 64, (Kind::Int64, tch::Device::Cpu));
    let px = (i * 37 + 11)
        .remainder(256)
        .to_kind(Kind::Uint8)
        .view([n, 1, 8, 8]);
    let data = ddpm::data::Dataset::from_pixels(px, "pictures").expect("dataset");
    let mut trainer = ddpm::train::Trainer::new(&cfg, tch::Device::Cpu).expect("trainer");
    let plan = trainer.plan();
    let shard = group.as_ref().map(|(_, rank, world)| (*rank, *world));
    if let Some((group, _, _)) = group {
        trainer.set_process_group(group);
    }
    for step in 1..=10 {
        let batch = plan.batch(&data, step).expect("batch");
        let batch = match shard {
            Some((rank, world)) => ddpm::distributed::shard(&batch, rank, world).expect("shard"),
            None => batch,
        };
        trainer.train_step(&batch).expect("train step");
    }
    let mut weights: Vec<(String, Tensor)> = trainer.var_store().variables().into_iter().collect();
    weights.sort_by(|a, b| a.0.cmp(&b.0));
    weights
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
    if case == "train" {
        // The trainer's data-parallel step; the weights go to DDPM_DIST_TEST_OUT.
        let out = std::env::var("DDPM_DIST_TEST_OUT").expect("DDPM_DIST_TEST_OUT");
        let group = ProcessGroup::join(&launch, timeout).expect("join");
        let weights = train_10(Some((group, launch.rank, launch.world_size)));
        let path = std::path::Path::new(&out).join(format!("rank{}.safetensors", launch.rank));
        Tensor::write_safetensors(&weights, &path).expect("write the weights");
        println!("REPORT trained");
        return;
    }
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

/// 2 ranks × 10 steps, each on its half of every global batch of 4, against 1 process × 10
/// steps on the whole batches. The ranks must agree bitwise (the same averaged gradient, the
/// same LAMB arithmetic); against the single process only the f32 summation order differs
/// (two shard means averaged vs one mean of 4, and Gloo's sum), so the weights agree to
/// rounding amplified through 10 LAMB steps: the bound is argued in docs/distributed.md.
#[test]
fn two_ranks_train_like_one_process_with_the_whole_batch() {
    let dir = common::scratch();
    let out = dir.path().display().to_string();
    let results = run_with(
        "train",
        &[0, 1],
        2,
        Duration::from_secs(120),
        &[("DDPM_DIST_TEST_OUT", out)],
    );
    for (rank, (ok, text)) in results.iter().enumerate() {
        assert!(ok, "rank {rank}:\n{text}");
        report(text, "REPORT trained");
    }
    let load = |r: usize| {
        let mut w = Tensor::read_safetensors(dir.path().join(format!("rank{r}.safetensors")))
            .expect("weights");
        w.sort_by(|a, b| a.0.cmp(&b.0));
        w
    };
    let (rank0, rank1) = (load(0), load(1));
    let single = train_10(None);
    assert_eq!(rank0.len(), single.len());
    let mut worst = (0.0f64, String::new());
    for (((n0, w0), (n1, w1)), (n, w)) in rank0.iter().zip(&rank1).zip(&single) {
        assert_eq!((n0, n1), (n, n));
        assert!(w0.equal(w1), "{n}: the ranks disagree");
        let d = f64::try_from((w0 - w).abs().max()).expect("max");
        if d > worst.0 {
            worst = (d, n.clone());
        }
    }
    println!(
        "largest |2 ranks − 1 process| over the weights: {:e} ({})",
        worst.0, worst.1
    );
    assert!(worst.0 < 1e-5, "{} differs by {:e}", worst.1, worst.0);
}

#[test]
fn ddpm_info_lists_the_built_in_backends() {
    let out = common::ddpm().arg("info").output().expect("run ddpm info");
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("distributed backends: gloo\n"), "{stdout}");
}
