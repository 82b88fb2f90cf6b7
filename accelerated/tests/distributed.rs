//! Data-parallel training across real processes on 127.0.0.1 (issue 16).
//!
//! The `ddpm train` binary under torchrun (`.venv/bin/torchrun`, as users start it) and with
//! torchrun's variables set by the test (to kill or stop one rank, or start one with other
//! settings); and the library's plumbing, for which this executable (`harness = false`, see
//! distributed/tests/ranks/mod.rs) re-runs itself as each rank. Every process is bounded by a
//! deadline and killed past it.

mod common;
#[path = "../../distributed/tests/ranks/mod.rs"]
mod ranks;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ddpm::distributed::{Launch, ProcessGroup};
use ddpm::error::DdpmError;
use ranks::{line as report, wait_all, Ended, Proc};
use tch::{Kind, Tensor};

const CASE: &str = "DDPM_DIST_TEST_CASE";

fn main() -> ExitCode {
    let code = ranks::main(
        CASE,
        rank_process,
        &[
            (
                "torchrun_two_ranks_train_like_one_process_and_write_once",
                torchrun_two_ranks_train_like_one_process_and_write_once,
            ),
            (
                "torchrun_resume_works_across_world_sizes",
                torchrun_resume_works_across_world_sizes,
            ),
            (
                "a_killed_rank_stops_the_other_naming_it",
                a_killed_rank_stops_the_other_naming_it,
            ),
            (
                "a_hung_rank_stops_the_other_within_the_timeout",
                a_hung_rank_stops_the_other_within_the_timeout,
            ),
            (
                "ranks_started_with_other_settings_are_refused",
                ranks_started_with_other_settings_are_refused,
            ),
            (
                "a_batch_the_ranks_cannot_share_is_refused_before_joining",
                a_batch_the_ranks_cannot_share_is_refused_before_joining,
            ),
            (
                "two_ranks_average_their_gradients_in_one_buffer",
                two_ranks_average_their_gradients_in_one_buffer,
            ),
            (
                "a_rank_without_its_peer_fails_naming_itself",
                a_rank_without_its_peer_fails_naming_itself,
            ),
            (
                "two_ranks_train_like_one_process_with_the_whole_batch",
                two_ranks_train_like_one_process_with_the_whole_batch,
            ),
            (
                "ddpm_info_lists_the_built_in_backends",
                ddpm_info_lists_the_built_in_backends,
            ),
        ],
    );
    // The runs the torchrun tests share.
    if let Ok(mut shared) = REFERENCE.lock() {
        shared.take();
    }
    code
}

/// This executable as `ranks` of a world of `world`, each with torchrun's variables and its
/// rank rank-process `case`; each one's (success, stdout + stderr), all killed past `deadline`.
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
    let port = ranks::free_port();
    let procs = ranks
        .iter()
        .map(|&r| {
            let mut cmd = Command::new(std::env::current_exe().expect("test executable"));
            cmd.envs(extra.iter().map(|(k, v)| (*k, v.as_str())))
                .env(CASE, case)
                .envs(launch_vars(r, world, port))
                .env("OMP_NUM_THREADS", "1");
            Proc::spawn(cmd)
        })
        .collect();
    wait_all(&format!("case {case}"), procs, deadline)
        .into_iter()
        .map(|e| (e.success(), e.output))
        .collect()
}

/// torchrun's five variables for `rank` of `world` on 127.0.0.1:`port` (rank 0 serves the
/// store: there is no torchrun agent).
fn launch_vars(rank: usize, world: usize, port: u16) -> Vec<(&'static str, String)> {
    vec![
        ("RANK", rank.to_string()),
        ("WORLD_SIZE", world.to_string()),
        ("LOCAL_RANK", rank.to_string()),
        ("MASTER_ADDR", "127.0.0.1".into()),
        ("MASTER_PORT", port.to_string()),
    ]
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

/// One rank of the library's cases, started by the tests below (this executable with CASE
/// set and torchrun's variables).
fn rank_process(case: &str) {
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

fn ddpm_info_lists_the_built_in_backends() {
    let out = common::ddpm().arg("info").output().expect("run ddpm info");
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let backends = if cfg!(feature = "nccl") {
        "distributed backends: gloo, nccl\n"
    } else {
        "distributed backends: gloo\n"
    };
    assert!(stdout.contains(backends), "{stdout}");
}

// ---- the `ddpm train` binary --------------------------------------------------------------

/// torchrun from the bootstrap's venv.
fn torchrun_path() -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/torchrun");
    assert!(
        path.exists(),
        "{} is missing: run scripts/bootstrap.sh",
        path.display()
    );
    path
}

/// `torchrun --nproc_per_node=2 … ddpm --device cpu --no-progress train ARGS` on 127.0.0.1, one
/// libtorch thread a rank.
fn torchrun_train(args: &[&str]) -> Command {
    let mut cmd = Command::new(torchrun_path());
    cmd.args([
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        &format!("--master_port={}", ranks::free_port()),
        "--no-python",
        common::DDPM,
        "--device",
        "cpu",
        "--no-progress",
        "train",
    ])
    .args(args)
    .env("OMP_NUM_THREADS", "1")
    .env("MKL_NUM_THREADS", "1")
    .env_remove("RUST_LOG");
    cmd
}

/// `ddpm train ARGS` as `rank` of `world` on 127.0.0.1:`port`, started by hand (rank 0 serves
/// the store).
fn rank_train(rank: usize, world: usize, port: u16, args: &[&str]) -> Proc {
    let mut cmd = common::ddpm();
    cmd.arg("train")
        .args(args)
        .envs(launch_vars(rank, world, port));
    Proc::spawn(cmd)
}

fn ran(what: &str, cmd: Command, deadline: Duration) -> Ended {
    let ended = wait_all(what, vec![Proc::spawn(cmd)], deadline).remove(0);
    assert!(ended.success(), "{what} failed:\n{}", ended.output);
    ended
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

/// The runs the torchrun tests compare: the tiny config (dropout 0, batch 4, 10 steps, a
/// checkpoint every 5) trained by 2 ranks and by 1 process.
struct Reference {
    dir: tempfile::TempDir,
    config: PathBuf,
    two: PathBuf,
    one: PathBuf,
    two_stdout: String,
}

static REFERENCE: Mutex<Option<Reference>> = Mutex::new(None);

fn with_reference<T>(f: impl FnOnce(&Reference) -> T) -> T {
    let mut shared = REFERENCE.lock().unwrap_or_else(|e| e.into_inner());
    let reference = shared.get_or_insert_with(|| {
        let setup = common::Setup::new(10, 5);
        let (two, one) = (setup.dir.path().join("two"), setup.dir.path().join("one"));
        let config = setup.config.clone();
        let c = path_str(&config).to_string();
        let two_run = ran(
            "torchrun, 2 ranks",
            torchrun_train(&["--config", &c, "--out", path_str(&two)]),
            Duration::from_secs(120),
        );
        let mut single = common::ddpm();
        single.args(["train", "--config", &c, "--out", path_str(&one)]);
        ran("1 process", single, Duration::from_secs(60));
        Reference {
            dir: setup.dir,
            config,
            two,
            one,
            two_stdout: two_run.output,
        }
    });
    f(reference)
}

/// The largest |a − b| over a checkpoint part's tensors, and where; panics if the names or
/// shapes differ.
fn largest_difference(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> (f64, String) {
    assert_eq!(a.len(), b.len());
    let mut worst = (0.0f64, String::new());
    for ((na, ta), (nb, tb)) in a.iter().zip(b) {
        assert_eq!(na, nb);
        assert_eq!(ta.size(), tb.size(), "{na}");
        let d = f64::try_from(
            (ta.to_kind(Kind::Double) - tb.to_kind(Kind::Double))
                .abs()
                .max(),
        )
        .expect("max");
        if d > worst.0 {
            worst = (d, na.clone());
        }
    }
    worst
}

/// Checkpoint `step` of `a` and `b`: weights and EMA within `bound`; LAMB's moments within
/// `bound` times the moment's largest magnitude (v is a square of gradients, far below 1).
fn assert_checkpoints_agree(a: &Path, b: &Path, step: u64, bound: f64, what: &str) {
    let load = |run: &Path| {
        ddpm::checkpoint::load(
            &ddpm::train::checkpoints_dir(run).join(ddpm::checkpoint::dir_name(step)),
        )
        .unwrap_or_else(|e| panic!("{what}: {e}"))
    };
    let (x, y) = (load(a), load(b));
    assert_eq!(x.manifest.step, step);
    for (part, p, q) in [
        ("weights", &x.state.model, &y.state.model),
        ("EMA", &x.state.ema, &y.state.ema),
    ] {
        let (d, name) = largest_difference(p, q);
        println!("{what}: {part}: largest difference {d:e} ({name})");
        assert!(d < bound, "{what}: {part} {name} differs by {d:e}");
    }
    assert_eq!(x.state.optim.len(), y.state.optim.len());
    let mut worst = (0.0f64, String::new());
    for ((n, p), (_, q)) in x.state.optim.iter().zip(&y.state.optim) {
        let scale = f64::try_from(q.to_kind(Kind::Double).abs().max()).expect("max");
        let d = f64::try_from(
            (p.to_kind(Kind::Double) - q.to_kind(Kind::Double))
                .abs()
                .max(),
        )
        .expect("max");
        let rel = if scale > 0.0 { d / scale } else { d };
        if rel > worst.0 {
            worst = (rel, n.clone());
        }
    }
    println!(
        "{what}: LAMB state: largest difference relative to the tensor's largest magnitude {:e} ({})",
        worst.0, worst.1
    );
    assert!(
        worst.0 < bound,
        "{what}: LAMB {} differs by {:e}",
        worst.1,
        worst.0
    );
}

fn losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .expect("metrics.jsonl")
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("a JSON line");
            v["loss"].as_f64().expect("loss")
        })
        .collect()
}

/// Every file under `dir`, relative to it, sorted (the lock file left out).
fn files(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).expect("read_dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                out.push(
                    path.strip_prefix(root)
                        .expect("under root")
                        .display()
                        .to_string(),
                );
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.retain(|f| f != ddpm::train::LOCK_FILE);
    out.sort();
    out
}

/// The bound on |2 ranks − 1 process| after 10 steps, argued in docs/distributed.md: only the
/// f32 summation order differs (the two shard means averaged by Gloo against one mean over
/// the batch).
const AGREEMENT: f64 = 1e-5;

/// 2 torchrun ranks × 10 steps against 1 process × 10 steps of the same global batch of 4:
/// weights, EMA and LAMB moments agree (the bound above), the logged losses (the global
/// batch's, averaged over the ranks) agree, and the run directory holds exactly what the
/// single process writes: one metrics line a step, one config, the same checkpoints and
/// grid, the final line printed once.
fn torchrun_two_ranks_train_like_one_process_and_write_once() {
    with_reference(|r| {
        for step in [5, 10] {
            assert_checkpoints_agree(&r.two, &r.one, step, AGREEMENT, "2 ranks vs 1 process");
        }
        // Each rank trained on its half of every batch: the arithmetic is not one process's
        // (a rank given the whole batch, its gradient averaged with an equal one, would end
        // bitwise where one process does). Deterministic: the same runs give the same figure.
        let last = |run: &Path| {
            ddpm::checkpoint::load(
                &ddpm::train::checkpoints_dir(run).join(ddpm::checkpoint::dir_name(10)),
            )
            .expect("checkpoint 10")
        };
        let (d, _) = largest_difference(&last(&r.two).state.model, &last(&r.one).state.model);
        assert!(
            d > 0.0,
            "2 ranks ended bitwise where 1 process did: no rank took a shard"
        );
        let (two, one) = (losses(&r.two), losses(&r.one));
        assert_eq!(two.len(), 10, "one metrics line a step, written once");
        for (step, (a, b)) in two.iter().zip(&one).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs(),
                "step {}: loss {a} on 2 ranks, {b} on 1",
                step + 1
            );
        }
        assert_eq!(files(&r.two), files(&r.one));
        assert_eq!(
            r.two_stdout.matches("trained 10 steps").count(),
            1,
            "{}",
            r.two_stdout
        );
    });
}

/// Checkpoints do not depend on the world size: step 5 of the 2-rank run resumed on 1 process,
/// step 5 of the 1-process run resumed on 2 ranks, and step 5 of the 2-rank run resumed on 2
/// ranks, each to step 10, against the uninterrupted runs (the last bitwise: the same ranks
/// redo the same arithmetic).
fn torchrun_resume_works_across_world_sizes() {
    with_reference(|r| {
        let c = path_str(&r.config);
        let copy = |from: &Path, to: &Path| {
            let src = ddpm::train::checkpoints_dir(from).join(ddpm::checkpoint::dir_name(5));
            let dst = ddpm::train::checkpoints_dir(to).join(ddpm::checkpoint::dir_name(5));
            std::fs::create_dir_all(&dst).expect("mkdir");
            for entry in std::fs::read_dir(&src).expect("read_dir") {
                let entry = entry.expect("entry");
                std::fs::copy(entry.path(), dst.join(entry.file_name())).expect("copy");
            }
            std::fs::copy(from.join("config.toml"), to.join("config.toml")).expect("copy");
        };
        let base = r.dir.path();
        let (two_to_one, one_to_two, two_to_two) =
            (base.join("2to1"), base.join("1to2"), base.join("2to2"));
        copy(&r.two, &two_to_one);
        copy(&r.one, &one_to_two);
        copy(&r.two, &two_to_two);
        let mut single = common::ddpm();
        single.args([
            "train",
            "--resume",
            "--config",
            c,
            "--out",
            path_str(&two_to_one),
        ]);
        ran(
            "resume of 2 ranks on 1 process",
            single,
            Duration::from_secs(60),
        );
        ran(
            "resume of 1 process on 2 ranks",
            torchrun_train(&["--resume", "--config", c, "--out", path_str(&one_to_two)]),
            Duration::from_secs(120),
        );
        ran(
            "resume of 2 ranks on 2 ranks",
            torchrun_train(&["--resume", "--out", path_str(&two_to_two)]),
            Duration::from_secs(120),
        );
        assert_checkpoints_agree(&two_to_one, &r.two, 10, AGREEMENT, "2 ranks → 1 vs 2 ranks");
        assert_checkpoints_agree(&two_to_one, &r.one, 10, AGREEMENT, "2 ranks → 1 vs 1");
        assert_checkpoints_agree(&one_to_two, &r.one, 10, AGREEMENT, "1 → 2 ranks vs 1");
        assert_checkpoints_agree(&two_to_two, &r.two, 10, f64::MIN_POSITIVE, "2 → 2 vs 2");
    });
}

/// Starts 2 ranks by hand on a long run of the tiny config (a checkpoint every 5 steps, a
/// `timeout`-second timeout) and waits until rank 0 has written checkpoint 10.
fn two_ranks_under_way(timeout: u64) -> (tempfile::TempDir, PathBuf, Vec<Proc>) {
    let setup = common::Setup::new(100_000, 5);
    let out = setup.dir.path().join("run");
    let port = ranks::free_port();
    let t = timeout.to_string();
    let args = [
        "--config",
        path_str(&setup.config),
        "--out",
        path_str(&out),
        "--distributed-timeout",
        &t,
    ];
    let procs = vec![rank_train(0, 2, port, &args), rank_train(1, 2, port, &args)];
    let ten = ddpm::train::checkpoints_dir(&out).join(ddpm::checkpoint::dir_name(10));
    let start = Instant::now();
    while !ten.exists() {
        if start.elapsed() > Duration::from_secs(60) {
            let text: String = wait_all("2 ranks", procs, Duration::ZERO)
                .into_iter()
                .map(|e| e.output)
                .collect();
            panic!("no checkpoint 10 within 60 s:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    (setup.dir, out, procs)
}

/// Every checkpoint left loads whole.
fn assert_checkpoints_whole(run: &Path) {
    let root = ddpm::train::checkpoints_dir(run);
    let list = ddpm::checkpoint::list(&root).expect("list");
    assert!(!list.is_empty());
    for (step, dir) in &list {
        let ckpt = ddpm::checkpoint::load(dir).unwrap_or_else(|e| panic!("step {step}: {e}"));
        assert_eq!(ckpt.manifest.step, *step);
    }
}

/// Rank 1 killed (SIGKILL) mid-run: rank 0 exits non-zero at once (its peer's sockets
/// close), well within the 20 s timeout, naming rank 1; every checkpoint left is whole.
fn a_killed_rank_stops_the_other_naming_it() {
    let (_dir, out, mut procs) = two_ranks_under_way(20);
    procs[1].child.kill().expect("kill rank 1");
    let ended = wait_all(
        "rank 0 after rank 1 was killed",
        procs,
        Duration::from_secs(40),
    );
    let rank0 = &ended[0];
    println!("rank 0 ended {:?} after rank 1 was killed", rank0.after);
    assert!(!rank0.success(), "rank 0 succeeded:\n{}", rank0.output);
    assert!(
        rank0.output.contains("rank 0 of 2: lost rank 1 during"),
        "{}",
        rank0.output
    );
    assert!(rank0.after < Duration::from_secs(20), "{:?}", rank0.after);
    assert_checkpoints_whole(&out);
}

/// Rank 1 stopped (SIGSTOP, a hang) mid-run: rank 0 gives up after the 4 s timeout, not
/// before, naming rank 1 and the setting; every checkpoint left is whole.
fn a_hung_rank_stops_the_other_within_the_timeout() {
    let timeout = 4;
    let (_dir, out, mut procs) = two_ranks_under_way(timeout);
    let pid = procs[1].child.id().to_string();
    let stopped = Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .expect("kill -STOP");
    assert!(stopped.success());
    let mut rank1 = procs.pop().expect("rank 1");
    let ended = wait_all("rank 0 with rank 1 stopped", procs, Duration::from_secs(40));
    let _ = rank1.child.kill();
    let _ = wait_all("rank 1", vec![rank1], Duration::from_secs(10));
    let rank0 = &ended[0];
    println!("rank 0 ended {:?} after rank 1 was stopped", rank0.after);
    assert!(!rank0.success(), "rank 0 succeeded:\n{}", rank0.output);
    assert!(
        rank0.output.contains(&format!(
            "rank 0 of 2: lost rank 1 during all_reduce (it exited, or did not answer within train.distributed_timeout_s = {timeout} s)"
        )),
        "{}",
        rank0.output
    );
    // A step takes a few ms, so the collective that waits began at most that before the stop.
    assert!(
        rank0.after >= Duration::from_millis(timeout * 1000 - 500),
        "{:?}",
        rank0.after
    );
    assert!(
        rank0.after < Duration::from_secs(timeout + 10),
        "{:?}",
        rank0.after
    );
    assert_checkpoints_whole(&out);
}

/// Rank 1 started with another --lr: both ranks refuse at start, naming rank 1, and nothing is
/// trained.
fn ranks_started_with_other_settings_are_refused() {
    let setup = common::Setup::new(10, 5);
    let out = setup.dir.path().join("run");
    let port = ranks::free_port();
    let args = [
        "--config",
        path_str(&setup.config),
        "--out",
        path_str(&out),
        "--distributed-timeout",
        "20",
    ];
    let mut other = args.to_vec();
    other.extend(["--lr", "0.002"]);
    let ended = wait_all(
        "2 ranks, other settings",
        vec![
            rank_train(0, 2, port, &args),
            rank_train(1, 2, port, &other),
        ],
        Duration::from_secs(40),
    );
    for (rank, e) in ended.iter().enumerate() {
        assert!(!e.success(), "rank {rank} succeeded:\n{}", e.output);
        assert!(
            e.output.contains(&format!(
                "rank {rank} of 2: rank 1 started with settings other than rank 0's"
            )),
            "rank {rank}:\n{}",
            e.output
        );
    }
    let trained = ddpm::checkpoint::list(&ddpm::train::checkpoints_dir(&out)).unwrap_or_default();
    assert!(trained.is_empty(), "{trained:?}");
}

/// A world of 3 and a global batch of 4: refused at once, before joining (no peer is started),
/// naming the setting and its flag.
fn a_batch_the_ranks_cannot_share_is_refused_before_joining() {
    let setup = common::Setup::new(10, 5);
    let out = setup.dir.path().join("run");
    let ended = wait_all(
        "rank 0 of 3",
        vec![rank_train(
            0,
            3,
            ranks::free_port(),
            &[
                "--config",
                path_str(&setup.config),
                "--out",
                path_str(&out),
                "--batch-size",
                "4",
            ],
        )],
        Duration::from_secs(20),
    );
    let e = &ended[0];
    assert!(!e.success());
    assert!(
        e.output.contains("train.batch_size (--batch-size)") && e.output.contains("world size 3"),
        "{}",
        e.output
    );
    assert!(!out.exists(), "the run directory was created");
}
