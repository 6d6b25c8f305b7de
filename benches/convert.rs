//! `cargo bench --bench convert`: how fast and how lean `mixq convert` is on a medium synthetic
//! upstream checkpoint, next to the I/O floor (a plain copy) and mlx-lm's own conversion.
//!
//! Not a test: it prints figures. Steps:
//! 1. generate (once, cached in `target/bench-data/medium-src`) the `medium` synthetic checkpoint;
//! 2. time a plain copy of its files (read, write, fsync), the floor any converter sits on;
//! 3. run the `mixq` CLI on it (recipe `gpt-oss-120b-3.6bit`) with `--quantizer mse` and with
//!    `--quantizer minmax`: wall time and peak RSS, and the ratio of the two;
//! 4. run the mlx-lm reference conversion (`benches/mlx_convert.py`) with the venv python from
//!    `MIXQ_PYTHON` (default `.venv/bin/python`): wall time and peak RSS;
//! 5. break down mixq's time in-process: MXFP4 decode alone, decode + 3-bit quantize, output
//!    hashing, and a single-thread micro-benchmark of both quantizers for every bit width.
//!
//! Copy, mixq and mlx-lm run as child processes. Their peak RSS is `ru_maxrss` from `wait4`;
//! a thread also samples `/proc/PID/status` to split it into anonymous and file-backed (mapped
//! source) memory. A child's `ru_maxrss` can count memory of the process that spawned it, so every
//! child is started while this process is still small: generation also runs in a child, and the
//! in-process breakdown comes last. Everything reads a warm page cache. Wall times suffer from
//! other work on the machine; CPU seconds (user + system) are printed beside them.
//!
//! Environment: `MIXQ_PYTHON` (python of a venv with mlx and mlx-lm), `MIXQ_BENCH_RUNS` (timed
//! runs of copy and mixq, default 3), `MIXQ_BENCH_MLX_RUNS` (of mlx-lm, default 1). The table
//! shows the median and the best wall time of each. Delete `target/bench-data` to regenerate the
//! source (after a change to the generator, say).

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use half::bf16;
use mixq_loader::Checkpoint;
use mixq_quantizer::kernels::affine::{packed_row_bytes, quantize_row, AFFINE_BITS};
use mixq_quantizer::recipe::plan::Allocation;
use mixq_quantizer::writer::rows::RowSource;
use mixq_quantizer::kernels::mse::quantize_row_mse;
use mixq_quantizer::{Recipe, TensorClass};
use rayon::prelude::*;

/// Synthetic shape preset converted by the bench.
const PRESET: &str = "medium";
/// Recipe used by both converters.
const RECIPE: &str = "gpt-oss-120b-3.6bit";
/// Expert bits and group size of that recipe, for the in-process breakdown.
const EXPERT_BITS: u32 = 3;
/// Group size of the expert quantization.
const GROUP_SIZE: usize = 64;
/// Target: mixq at least this many times faster than mlx-lm.
const TARGET_SPEEDUP: f64 = 5.0;
/// Target: the `mse` quantizer's conversion at most this many times slower than `minmax`'s.
const TARGET_MSE_SLOWDOWN: f64 = 3.0;
/// Target: mixq's peak RSS at most this fraction of mlx-lm's.
const TARGET_RSS_FRACTION: f64 = 0.25;
/// Side of the square matrix of the quantize micro-benchmark.
const MICRO_SIDE: usize = 1024;
/// Marker of the JSON line printed by `mlx_convert.py`.
const MLX_JSON_MARKER: &str = "MIXQ_BENCH_JSON ";
/// Child-mode flag: generate the synthetic checkpoint into the folder that follows.
const GENERATE_FLAG: &str = "--mixq-bench-generate";
/// Child-mode flag: copy the files of the first folder into the second (the I/O floor).
const COPY_FLAG: &str = "--mixq-bench-copy";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    // Child modes, entered when the bench re-executes itself.
    if let Some(i) = args.iter().position(|a| a == GENERATE_FLAG) {
        let dir = PathBuf::from(args.get(i + 1).expect("--mixq-bench-generate needs a folder"));
        let shape = mixq_synth::Shape::preset(PRESET).expect("the medium preset exists");
        mixq_synth::write_checkpoint(&dir, &shape).expect("writing the synthetic checkpoint");
        return ExitCode::SUCCESS;
    }
    if let Some(i) = args.iter().position(|a| a == COPY_FLAG) {
        let from = PathBuf::from(args.get(i + 1).expect("--mixq-bench-copy needs a source folder"));
        let to = PathBuf::from(args.get(i + 2).expect("--mixq-bench-copy needs a destination folder"));
        copy_files(&from, &to);
        return ExitCode::SUCCESS;
    }
    bench();
    ExitCode::SUCCESS
}

/// The whole benchmark, printing as it goes and a summary table at the end.
fn bench() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let data = root.join("target").join("bench-data");
    std::fs::create_dir_all(&data).expect("creating target/bench-data");
    let runs = env_count("MIXQ_BENCH_RUNS", 3);
    let mlx_runs = env_count("MIXQ_BENCH_MLX_RUNS", 1);

    let src = data.join(format!("{PRESET}-src"));
    ensure_source(&src);
    let src_bytes = folder_bytes(&src);
    let warm = Instant::now();
    warm_page_cache(&src);
    println!("read the source once to warm the page cache: {:.2} s", warm.elapsed().as_secs_f64());
    let src_tensor_bytes = Checkpoint::open(&src).expect("opening the synthetic checkpoint").tensor_bytes();
    println!(
        "source: {} ({:.1} MB in files, {:.1} MB of tensor data), recipe {RECIPE}, {} CPU thread(s), {runs} timed run(s) of copy and mixq, {mlx_runs} of mlx-lm",
        src.display(),
        mb(src_bytes),
        mb(src_tensor_bytes),
        rayon::current_num_threads()
    );
    let spawn_floor = self_peak_rss_kib();
    let load_at_start = load_average();
    println!("load average: {load_at_start}");

    // 2. The I/O floor.
    let copy_dir = data.join(format!("{PRESET}-copy"));
    let exe = std::env::current_exe().expect("locating the bench executable");
    let copy = repeat(runs, "copy", || {
        remove_dir(&copy_dir);
        let mut cmd = Command::new(&exe);
        cmd.arg(COPY_FLAG).arg(&src).arg(&copy_dir);
        let r = run_child(&mut cmd, &data.join("copy.log")).unwrap_or_else(|e| panic!("plain copy: {e}"));
        remove_dir(&copy_dir);
        r
    });

    // 3. mixq, with mlx's own quantizer (minmax) and with the error-minimising search (mse).
    let mixq_out = data.join(format!("{PRESET}-mixq"));
    let convert_with = |quantizer: &str| {
        repeat(runs, &format!("mixq convert --quantizer {quantizer}"), || {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_mixq"));
            cmd.arg("convert").arg("--source").arg(&src).args(["--recipe", RECIPE]).arg("--out").arg(&mixq_out);
            cmd.args(["--force", "--quiet", "--quantizer", quantizer]);
            run_child(&mut cmd, &data.join("mixq.log")).unwrap_or_else(|e| panic!("mixq convert: {e}"))
        })
    };
    let mse = convert_with("mse");
    let mixq = convert_with("minmax");
    let mixq_out_bytes = folder_bytes(&mixq_out);
    bench_gptq(&src, &mixq_out, &data, runs, &mse);

    // 4. mlx-lm.
    let mlx_out = data.join(format!("{PRESET}-mlx"));
    let mlx = run_mlx(root, &src, &mlx_out, &data, mlx_runs);
    if let Err(why) = &mlx {
        println!("  mlx-lm reference skipped: {why}");
    }
    let mlx_out_bytes = mlx.as_ref().ok().map(|_| folder_bytes(&mlx_out));
    remove_dir(&mlx_out);

    // 5. Breakdown, in-process (after the children: it maps and touches the whole source).
    println!("\nin-process breakdown of mixq's work ({} threads, no writes):", rayon::current_num_threads());
    let breakdown = Breakdown::measure(&src, &mixq_out);
    remove_dir(&mixq_out);
    println!("\nquantize_row micro-benchmark: {MICRO_SIDE}x{MICRO_SIDE} f32 (decoded MXFP4 expert rows), group size {GROUP_SIZE}, one thread:");
    micro_quantize(&src);

    // 6. Summary.
    summary(src_bytes, spawn_floor, &load_at_start, &copy, &mixq, &mse, mixq_out_bytes, mlx.as_ref(), mlx_out_bytes, &breakdown);
}

/// `--quantizer gptq` on the same source: calibration with Hessians (2,048 tokens of the dev text,
/// timed apart), then the conversion, against `mse`'s, with the floating-point work of the error
/// feedback estimated from the plan (2·rows·cols² per matrix with a Hessian, plus the three
/// cols³-order factorisations per Hessian).
fn bench_gptq(src: &Path, out: &Path, data: &Path, runs: usize, mse: &Runs) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let stats = data.join(format!("{PRESET}-hessians.safetensors"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mixq"));
    cmd.arg("calibrate").arg("--model").arg(src).arg("--text").arg(root.join("models").join("shakespeare-dev.txt"));
    cmd.args(["--max-tokens", "2048", "--hessian", "--force", "--quiet", "--out"]).arg(&stats);
    let cal = run_child(&mut cmd, &data.join("calibrate.log")).unwrap_or_else(|e| panic!("mixq calibrate: {e}"));
    println!("  mixq calibrate --hessian (2,048 tokens): {:.2} s ({:.2} s CPU), {:.1} MB of statistics", cal.wall.as_secs_f64(), cal.cpu.as_secs_f64(), mb(std::fs::metadata(&stats).map(|m| m.len()).unwrap_or(0)));
    let gptq = repeat(runs, "mixq convert --quantizer gptq", || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_mixq"));
        cmd.arg("convert").arg("--source").arg(src).args(["--recipe", RECIPE]).arg("--out").arg(out);
        cmd.args(["--force", "--quiet", "--quantizer", "gptq", "--calibration"]).arg(&stats);
        run_child(&mut cmd, &data.join("mixq.log")).unwrap_or_else(|e| panic!("mixq convert --quantizer gptq: {e}"))
    });
    let ckpt = Checkpoint::open(src).expect("opening the synthetic checkpoint");
    let recipe = Recipe::load(RECIPE).expect("built-in recipe");
    let alloc = Allocation::resolve(ckpt.config(), &recipe).expect("the recipe fits");
    let (mut feedback, mut factor, mut sites) = (0f64, 0f64, std::collections::BTreeSet::new());
    for a in &alloc.assigned {
        let fed = matches!(a.action, mixq_quantizer::QuantFormat::Affine { .. })
            && !matches!(a.param.class, TensorClass::EmbedTokens | TensorClass::ExpertsDown);
        if fed {
            let (rows, cols) = (a.param.rows() as f64, a.param.in_features() as f64);
            feedback += 2.0 * rows * cols * cols;
            if let Some(site) = a.param.input_site() {
                if sites.insert(site) {
                    factor += 2.0 * (1.0 / 3.0 + 1.0 + 1.0 / 3.0) * cols * cols * cols;
                }
            }
        }
    }
    let extra_cpu = (gptq.cpu().as_secs_f64() - mse.cpu().as_secs_f64()).max(1e-9);
    println!(
        "gptq: median {:.2} s wall, {:.2} s CPU, peak RSS {:.0} MiB; {:.2}x mse's wall, {:.2}x its CPU; error feedback {:.1} GFLOP + factorisations {:.1} GFLOP (f64) over {} Hessians: {:.1} GFLOP/s of the CPU time gptq adds to mse",
        gptq.wall().as_secs_f64(),
        gptq.cpu().as_secs_f64(),
        mib(gptq.max_rss_kib()),
        gptq.wall().as_secs_f64() / mse.wall().as_secs_f64(),
        gptq.cpu().as_secs_f64() / mse.cpu().as_secs_f64().max(1e-9),
        feedback / 1e9,
        factor / 1e9,
        sites.len(),
        (feedback + factor) / 1e9 / extra_cpu
    );
}

/// A positive count from the environment variable `name`, or `default`.
fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).filter(|&n| n > 0).unwrap_or(default)
}

/// Wall time and peak resident set of one finished child process.
#[derive(Debug, Clone)]
struct ChildRun {
    /// From spawn to reaping.
    wall: Duration,
    /// User + system CPU time of the child (and its reaped descendants).
    cpu: Duration,
    /// `ru_maxrss`, KiB.
    max_rss_kib: u64,
    /// Largest anonymous and file-backed resident sets seen by sampling `/proc/PID/status`, KiB.
    sampled: RssSplit,
    /// Everything it printed on standard output.
    stdout: String,
}

/// Peaks of the two kinds of resident memory, sampled every few milliseconds.
#[derive(Debug, Clone, Copy, Default)]
struct RssSplit {
    /// `RssAnon`: heap, stacks, anonymous mappings.
    anon_kib: u64,
    /// `RssFile`: mapped files (page cache pages counted because the process maps them).
    file_kib: u64,
}

impl RssSplit {
    /// "anon A MiB, file-backed F MiB".
    fn describe(&self) -> String {
        format!("sampled peaks: anon {:.0} MiB, file-backed {:.0} MiB", mib(self.anon_kib), mib(self.file_kib))
    }
}

/// Samples `/proc/PID/status` until `stop` is set, keeping the largest `RssAnon` and `RssFile`.
fn sample_rss(pid: u32, stop: &std::sync::atomic::AtomicBool) -> RssSplit {
    let path = format!("/proc/{pid}/status");
    let mut peak = RssSplit::default();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        if let Ok(text) = std::fs::read_to_string(&path) {
            for line in text.lines() {
                let kib = |rest: &str| rest.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap_or(0);
                if let Some(rest) = line.strip_prefix("RssAnon:") {
                    peak.anon_kib = peak.anon_kib.max(kib(rest));
                } else if let Some(rest) = line.strip_prefix("RssFile:") {
                    peak.file_kib = peak.file_kib.max(kib(rest));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    peak
}

/// Several runs of one child: median wall time and largest peak RSS.
#[derive(Debug, Clone)]
struct Runs {
    /// Every run, in order.
    all: Vec<ChildRun>,
}

impl Runs {
    /// Median wall time.
    fn wall(&self) -> Duration {
        let mut w: Vec<Duration> = self.all.iter().map(|r| r.wall).collect();
        w.sort();
        w[w.len() / 2]
    }

    /// Shortest wall time.
    fn best(&self) -> Duration {
        self.all.iter().map(|r| r.wall).min().unwrap_or_default()
    }

    /// Median CPU time.
    fn cpu(&self) -> Duration {
        let mut c: Vec<Duration> = self.all.iter().map(|r| r.cpu).collect();
        c.sort();
        c[c.len() / 2]
    }

    /// Largest sampled anonymous and file-backed peaks over the runs.
    fn sampled(&self) -> RssSplit {
        self.all.iter().fold(RssSplit::default(), |a, r| RssSplit {
            anon_kib: a.anon_kib.max(r.sampled.anon_kib),
            file_kib: a.file_kib.max(r.sampled.file_kib),
        })
    }

    /// Largest peak RSS over the runs, KiB.
    fn max_rss_kib(&self) -> u64 {
        self.all.iter().map(|r| r.max_rss_kib).max().unwrap_or(0)
    }
}

/// Runs `f` `n` times, printing each run's figures.
fn repeat(n: usize, what: &str, mut f: impl FnMut() -> ChildRun) -> Runs {
    let all: Vec<ChildRun> = (0..n)
        .map(|i| {
            let r = f();
            println!(
                "  {what} run {}/{n}: {:.2} s ({:.2} s CPU), peak RSS {:.0} MiB ({})",
                i + 1,
                r.wall.as_secs_f64(),
                r.cpu.as_secs_f64(),
                mib(r.max_rss_kib),
                r.sampled.describe()
            );
            r
        })
        .collect();
    Runs { all }
}

/// Spawns `cmd` (stdout captured, stderr to `log`), reaps it with `wait4` and returns its wall
/// time, peak RSS and output; an error names the exit status and the log's tail.
fn run_child(cmd: &mut Command, log: &Path) -> Result<ChildRun, String> {
    let err_file = File::create(log).map_err(|e| format!("creating {}: {e}", log.display()))?;
    let out_path = log.with_extension("stdout");
    let out_file = File::create(&out_path).map_err(|e| format!("creating {}: {e}", out_path.display()))?;
    cmd.stdin(Stdio::null()).stdout(out_file).stderr(err_file);
    let start = Instant::now();
    let child = cmd.spawn().map_err(|e| format!("starting {:?}: {e}", cmd.get_program()))?;
    let pid = child.id() as libc::pid_t;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (stop, id) = (stop.clone(), child.id());
        std::thread::spawn(move || sample_rss(id, &stop))
    };
    let mut status: libc::c_int = 0;
    // SAFETY: rusage is plain old data; zero is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: pid is our own unreaped child; the pointers are to live locals.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if r == pid {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(format!("wait4 on pid {pid}: {e}"));
        }
    }
    let wall = start.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sampled = sampler.join().expect("the RSS sampler does not panic");
    // The child is reaped; dropping the handle neither waits nor kills.
    drop(child);
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        let how = if libc::WIFEXITED(status) {
            format!("exit status {}", libc::WEXITSTATUS(status))
        } else {
            format!("signal {}", libc::WTERMSIG(status))
        };
        let err = std::fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = err.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect();
        return Err(format!("{:?} failed ({how}); last lines of {}:\n{}", cmd.get_program(), log.display(), tail.join("\n")));
    }
    let cpu = timeval(usage.ru_utime) + timeval(usage.ru_stime);
    Ok(ChildRun { wall, cpu, max_rss_kib: usage.ru_maxrss as u64, sampled, stdout })
}

/// A `timeval` as a duration.
fn timeval(t: libc::timeval) -> Duration {
    Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
}

/// User + system CPU time of this process so far (all threads).
fn self_cpu() -> Duration {
    // SAFETY: rusage is plain old data; getrusage fills it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: the pointer is to a live local.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    timeval(usage.ru_utime) + timeval(usage.ru_stime)
}

/// Wall and CPU time of `f`.
fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration, Duration) {
    let (t, c) = (Instant::now(), self_cpu());
    let r = f();
    (r, t.elapsed(), self_cpu().saturating_sub(c))
}

/// The 1, 5 and 15 minute load averages, as `/proc/loadavg` shows them.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|t| t.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// This process's own peak RSS so far, KiB.
fn self_peak_rss_kib() -> u64 {
    // SAFETY: rusage is plain old data; getrusage fills it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: the pointer is to a live local.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    usage.ru_maxrss as u64
}

/// Generates the synthetic checkpoint into `src` unless a complete one is there (marker file
/// beside the folder), in a child process so that this process stays small.
fn ensure_source(src: &Path) {
    let marker = src.with_extension("complete");
    if marker.is_file() && src.join(mixq_loader::INDEX_FILE).is_file() {
        return;
    }
    println!("generating the {PRESET} synthetic checkpoint in {} (once)...", src.display());
    let _ = std::fs::remove_file(&marker);
    remove_dir(src);
    let exe = std::env::current_exe().expect("locating the bench executable");
    let mut cmd = Command::new(exe);
    cmd.arg(GENERATE_FLAG).arg(src);
    let log = src.with_extension("log");
    let r = run_child(&mut cmd, &log).unwrap_or_else(|e| panic!("generating {}: {e}", src.display()));
    println!("  generated in {:.1} s", r.wall.as_secs_f64());
    std::fs::write(&marker, "complete\n").expect("writing the completion marker");
}

/// Reads every file of `dir` once through a small buffer, so that timed runs find it cached.
fn warm_page_cache(dir: &Path) {
    let mut buf = vec![0u8; 8 << 20];
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("listing {}: {e}", dir.display())) {
        let path = entry.expect("reading a folder entry").path();
        if path.is_file() {
            let mut f = File::open(&path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
            while f.read(&mut buf).unwrap_or_else(|e| panic!("reading {}: {e}", path.display())) > 0 {}
        }
    }
}

/// Copies every file of `from` into a fresh `to` through an 8 MiB buffer, then fsyncs each
/// (mixq fsyncs its shards too).
fn copy_files(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap_or_else(|e| panic!("creating {}: {e}", to.display()));
    let mut buf = vec![0u8; 8 << 20];
    for entry in std::fs::read_dir(from).unwrap_or_else(|e| panic!("listing {}: {e}", from.display())) {
        let path = entry.expect("reading a folder entry").path();
        if !path.is_file() {
            continue;
        }
        let dst = to.join(path.file_name().expect("files have names"));
        let mut r = File::open(&path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
        let mut w = File::create(&dst).unwrap_or_else(|e| panic!("creating {}: {e}", dst.display()));
        loop {
            let n = r.read(&mut buf).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
            if n == 0 {
                break;
            }
            w.write_all(&buf[..n]).unwrap_or_else(|e| panic!("writing {}: {e}", dst.display()));
        }
        w.sync_all().unwrap_or_else(|e| panic!("syncing {}: {e}", dst.display()));
    }
}

/// Runs the mlx-lm reference conversion `runs` times (each run's phases printed), or says why it
/// cannot.
fn run_mlx(root: &Path, src: &Path, out: &Path, data: &Path, runs: usize) -> Result<Runs, String> {
    let python = match std::env::var_os("MIXQ_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => root.join(".venv").join("bin").join("python"),
    };
    if !python.exists() {
        return Err(format!(
            "python {} not found (set MIXQ_PYTHON to the python of a venv with mlx and mlx-lm)",
            python.display()
        ));
    }
    println!("  mlx-lm reference: {} benches/mlx_convert.py", python.display());
    let mut all = Vec::new();
    for i in 0..runs {
        remove_dir(out);
        let mut cmd = Command::new(&python);
        cmd.arg(root.join("benches").join("mlx_convert.py")).arg(src).arg(out).arg(RECIPE);
        let run = run_child(&mut cmd, &data.join("mlx.log")).map_err(|e| format!("the reference conversion failed: {e}"))?;
        let phases = run
            .stdout
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix(MLX_JSON_MARKER))
            .and_then(|j| serde_json::from_str::<serde_json::Value>(j).ok())
            .unwrap_or_default();
        let f = |k: &str| phases.get(k).and_then(serde_json::Value::as_f64).unwrap_or(f64::NAN);
        println!(
            "  mlx-lm run {}/{runs}: {:.2} s ({:.2} s CPU; import {:.2} s, load+dequantize+quantize {:.2} s, save {:.2} s), \
             peak RSS {:.0} MiB ({}; mlx allocator peak {:.0} MiB)",
            i + 1,
            run.wall.as_secs_f64(),
            run.cpu.as_secs_f64(),
            f("import"),
            f("build"),
            f("save"),
            mib(run.max_rss_kib),
            run.sampled.describe(),
            f("mlx_peak_memory") / 1048576.0
        );
        all.push(run);
    }
    Ok(Runs { all })
}

/// The MXFP4 row source of every expert weight in the checkpoint, with its row count, mapped as
/// mixq's converter does (gate rows are the even rows of `gate_up_proj`, up rows the odd ones).
fn expert_sources<'a>(ckpt: &'a Checkpoint, alloc: &Allocation) -> Vec<(RowSource<'a>, usize)> {
    let c = ckpt.config();
    let (i, h) = (c.intermediate_size, c.hidden_size);
    alloc
        .assigned
        .iter()
        .filter(|a| a.param.leaf == "weight")
        .filter_map(|a| {
            let p = &a.param;
            let (stem, start, step, src_rows) = match p.class {
                TensorClass::ExpertsGate => ("gate_up_proj", 0, 2, 2 * i),
                TensorClass::ExpertsUp => ("gate_up_proj", 1, 2, 2 * i),
                TensorClass::ExpertsDown => ("down_proj", 0, 1, h),
                _ => return None,
            };
            let base = format!("model.layers.{}.mlp.experts.{stem}", p.layer.expect("experts belong to a layer"));
            let tensor = |suffix: &str| {
                let name = format!("{base}_{suffix}");
                ckpt.tensor(&name).unwrap_or_else(|e| panic!("{name}: {e}")).data
            };
            let cols = p.in_features();
            let src = RowSource::Mxfp4 {
                blocks: tensor("blocks"),
                scales: tensor("scales"),
                cols,
                map: mixq_loader::RowMap { per: p.shape[1], src_per: src_rows, start, step },
            };
            Some((src, p.numel() / cols))
        })
        .collect()
}

/// In-process timings of the parts of mixq's conversion.
#[derive(Debug, Clone)]
struct Breakdown {
    /// Decoding every expert row to f32: wall, CPU.
    decode: (Duration, Duration),
    /// Decoding and quantizing every expert row (3-bit, group 64), no writes: wall, CPU.
    quantize: (Duration, Duration),
    /// sha256 of every output file (mixq's manifest step), in parallel: wall, CPU.
    hash: (Duration, Duration),
    /// Expert elements.
    expert_elems: usize,
    /// Expert source bytes (MXFP4 blocks and scales).
    expert_bytes: usize,
}

impl Breakdown {
    /// Runs the decode, decode + quantize and hashing passes once each.
    fn measure(src: &Path, mixq_out: &Path) -> Breakdown {
        let ckpt = Checkpoint::open(src).expect("opening the synthetic checkpoint");
        let recipe = Recipe::load(RECIPE).expect("the recipe is built in");
        let alloc = Allocation::resolve(ckpt.config(), &recipe).expect("the recipe fits the synthetic model");
        let sources = expert_sources(&ckpt, &alloc);
        let expert_elems: usize = sources.iter().map(|(s, rows)| s.cols() * rows).sum();
        let expert_bytes: usize = sources.iter().map(|(s, rows)| s.source_bytes_per_row() * rows).sum();

        // Touch the mapping once so that neither timed pass pays the page faults alone.
        decode_all(&sources);
        let ((), wall, cpu) = timed(|| decode_all(&sources));
        let decode = (wall, cpu);
        print_phase("(a) decode experts MXFP4 -> f32", decode, expert_elems, expert_bytes);

        let ((), wall, cpu) = timed(|| quantize_all(&sources));
        let quantize = (wall, cpu);
        print_phase(&format!("(b) decode + quantize experts {EXPERT_BITS}-bit gs{GROUP_SIZE}"), quantize, expert_elems, expert_bytes);

        let (hashed, wall, cpu) = timed(|| hash_folder(mixq_out));
        let hash = (wall, cpu);
        println!(
            "  {:<44} {:>6.2} s {:>6.2} s CPU  {:>6.0} MB/s of output ({:.1} MB)",
            "(d) sha256 of mixq's output files",
            wall.as_secs_f64(),
            cpu.as_secs_f64(),
            mb(hashed) / wall.as_secs_f64(),
            mb(hashed)
        );
        Breakdown { decode, quantize, hash, expert_elems, expert_bytes }
    }
}

/// Prints one breakdown line: wall and CPU time, element rate and source byte rate (per wall second).
fn print_phase(what: &str, (d, cpu): (Duration, Duration), elems: usize, bytes: usize) {
    let s = d.as_secs_f64();
    println!(
        "  {what:<44} {s:>6.2} s {:>6.2} s CPU  {:>6.0} Melem/s  {:>6.0} MB/s of expert source ({:.0} Melem, {:.1} MB)",
        cpu.as_secs_f64(),
        elems as f64 / 1e6 / s,
        mb(bytes as u64) / s,
        elems as f64 / 1e6,
        mb(bytes as u64)
    );
}

/// Decodes every expert row to f32, rows in parallel.
fn decode_all(sources: &[(RowSource<'_>, usize)]) {
    for (src, rows) in sources {
        (0..*rows).into_par_iter().for_each_init(
            || vec![0f32; src.cols()],
            |row, r| {
                src.row_f32(r, row);
                std::hint::black_box(&row);
            },
        );
    }
}

/// Decodes and quantizes every expert row, rows in parallel, keeping nothing.
fn quantize_all(sources: &[(RowSource<'_>, usize)]) {
    for (src, rows) in sources {
        let cols = src.cols();
        let groups = cols / GROUP_SIZE;
        (0..*rows).into_par_iter().for_each_init(
            || (vec![0f32; cols], vec![0u8; packed_row_bytes(cols, EXPERT_BITS)], vec![bf16::ZERO; groups], vec![bf16::ZERO; groups]),
            |(row, packed, scales, biases), r| {
                src.row_f32(r, row);
                quantize_row(row, EXPERT_BITS, GROUP_SIZE, packed, scales, biases).expect("synthetic weights are finite");
                std::hint::black_box((&packed, &scales, &biases));
            },
        );
    }
}

/// sha256 of every file in `dir`, files in parallel, as mixq's manifest step; returns bytes hashed.
fn hash_folder(dir: &Path) -> u64 {
    let files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
        .map(|e| e.expect("reading a folder entry").path())
        .filter(|p| p.is_file())
        .collect();
    files
        .par_iter()
        .map(|p| mixq_quantizer::writer::hash::sha256_file(p).unwrap_or_else(|e| panic!("hashing {}: {e}", p.display())).1)
        .sum()
}

/// Single-thread `quantize_row` throughput for every affine bit width, on the first
/// `MICRO_SIDE` rows of layer 0's down projection (decoded MXFP4, as convert sees them), with the
/// MXFP4 decode of the same rows for reference.
fn micro_quantize(src: &Path) {
    let ckpt = Checkpoint::open(src).expect("opening the synthetic checkpoint");
    let recipe = Recipe::load(RECIPE).expect("the recipe is built in");
    let alloc = Allocation::resolve(ckpt.config(), &recipe).expect("the recipe fits the synthetic model");
    let sources = expert_sources(&ckpt, &alloc);
    let (down, _) = sources
        .iter()
        .find(|(s, rows)| s.cols() == MICRO_SIDE && *rows >= MICRO_SIDE)
        .expect("an expert weight with 1024 columns and as many rows (the medium preset)");
    let n = (MICRO_SIDE * MICRO_SIDE) as f64;
    let report = |what: &str, (best, passes): (Duration, usize)| {
        let s = best.as_secs_f64();
        println!("  {what:<22} {:>8.0} Melem/s  ({:.2} ns/elem, best of {passes})", n / 1e6 / s, s * 1e9 / n);
    };

    let mut matrix = vec![0f32; MICRO_SIDE * MICRO_SIDE];
    report(
        "mxfp4 decode (ref.)",
        best_of(|| {
            for (r, row) in matrix.chunks_exact_mut(MICRO_SIDE).enumerate() {
                down.row_f32(r, row);
            }
            std::hint::black_box(&matrix);
        }),
    );
    let groups = MICRO_SIDE / GROUP_SIZE;
    for bits in AFFINE_BITS {
        let mut packed = vec![0u8; packed_row_bytes(MICRO_SIDE, bits)];
        let (mut scales, mut biases) = (vec![bf16::ZERO; groups], vec![bf16::ZERO; groups]);
        let timing = best_of(|| {
            for row in matrix.chunks_exact(MICRO_SIDE) {
                quantize_row(row, bits, GROUP_SIZE, &mut packed, &mut scales, &mut biases).expect("finite weights");
                std::hint::black_box((&packed, &scales, &biases));
            }
        });
        report(&format!("{bits}-bit gs{GROUP_SIZE}"), timing);
        let timing = best_of(|| {
            for row in matrix.chunks_exact(MICRO_SIDE) {
                quantize_row_mse(row, None, bits, GROUP_SIZE, &mut packed, &mut scales, &mut biases).expect("finite weights");
                std::hint::black_box((&packed, &scales, &biases));
            }
        });
        report(&format!("{bits}-bit gs{GROUP_SIZE} mse"), timing);
    }
}

/// Shortest time of `f` after one warm-up call, over at least 3 calls and about half a second.
fn best_of(mut f: impl FnMut()) -> (Duration, usize) {
    f();
    let mut best = Duration::MAX;
    let deadline = Instant::now() + Duration::from_millis(500);
    let mut passes = 0;
    while passes < 3 || Instant::now() < deadline {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed());
        passes += 1;
    }
    (best, passes)
}

/// Prints the summary table, ratios against the targets and the time breakdown.
#[allow(clippy::too_many_arguments)]
fn summary(
    src_bytes: u64,
    spawn_floor_kib: u64,
    load_at_start: &str,
    copy: &Runs,
    mixq: &Runs,
    mse: &Runs,
    mixq_out_bytes: u64,
    mlx: Result<&Runs, &String>,
    mlx_out_bytes: Option<u64>,
    b: &Breakdown,
) {
    let src_mb = mb(src_bytes);
    println!("\n== convert benchmark: {PRESET} synthetic checkpoint ({src_mb:.1} MB), recipe {RECIPE} ==");
    println!(
        "{:<28} {:>7} {:>7} {:>7} {:>11} {:>13} {:>16} {:>8}",
        "", "wall s", "best s", "CPU s", "source MB/s", "peak RSS MiB", "anon / file MiB", "out MB"
    );
    let line = |what: &str, wall: Duration, best: Duration, cpu: Duration, rss_kib: u64, split: RssSplit, out: Option<u64>| {
        let s = wall.as_secs_f64();
        let out = out.map(|o| format!("{:.1}", mb(o))).unwrap_or_else(|| "-".into());
        let split = format!("{:.0} / {:.0}", mib(split.anon_kib), mib(split.file_kib));
        println!(
            "{what:<28} {s:>7.2} {:>7.2} {:>7.2} {:>11.0} {:>13.0} {split:>16} {out:>8}",
            best.as_secs_f64(),
            cpu.as_secs_f64(),
            src_mb / s,
            mib(rss_kib)
        );
    };
    let copy_label = format!("copy, I/O floor (median/{})", copy.all.len());
    line(&copy_label, copy.wall(), copy.best(), copy.cpu(), copy.max_rss_kib(), copy.sampled(), Some(src_bytes));
    let mixq_label = format!("mixq, minmax (median/{})", mixq.all.len());
    line(&mixq_label, mixq.wall(), mixq.best(), mixq.cpu(), mixq.max_rss_kib(), mixq.sampled(), Some(mixq_out_bytes));
    let mse_label = format!("mixq, mse (median/{})", mse.all.len());
    line(&mse_label, mse.wall(), mse.best(), mse.cpu(), mse.max_rss_kib(), mse.sampled(), Some(mixq_out_bytes));
    match mlx {
        Ok(runs) => {
            let label = format!("mlx-lm reference (median/{})", runs.all.len());
            line(&label, runs.wall(), runs.best(), runs.cpu(), runs.max_rss_kib(), runs.sampled(), mlx_out_bytes)
        }
        Err(why) => println!("{:<28} skipped: {why}", "mlx-lm reference"),
    }
    let mixq_s = mixq.wall().as_secs_f64();
    println!();
    println!(
        "mixq time / copy time:     {:>6.2}x  (how far mixq is from the I/O floor; best runs {:.2}x)",
        mixq_s / copy.wall().as_secs_f64(),
        mixq.best().as_secs_f64() / copy.best().as_secs_f64()
    );
    let mse_ratio = mse.wall().as_secs_f64() / mixq_s;
    println!(
        "mse time / minmax time:    {mse_ratio:>6.2}x  (target <= {TARGET_MSE_SLOWDOWN}x: {}; best runs {:.2}x; in CPU seconds {:.2}x)",
        if mse_ratio <= TARGET_MSE_SLOWDOWN { "met" } else { "MISSED" },
        mse.best().as_secs_f64() / mixq.best().as_secs_f64(),
        mse.cpu().as_secs_f64() / mixq.cpu().as_secs_f64().max(1e-9)
    );
    if let Ok(mlx) = mlx {
        let speedup = mlx.wall().as_secs_f64() / mixq_s;
        let cpu_ratio = mlx.cpu().as_secs_f64() / mixq.cpu().as_secs_f64().max(1e-9);
        let rss = mixq.max_rss_kib() as f64 / mlx.max_rss_kib().max(1) as f64;
        let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
        println!(
            "mlx-lm time / mixq time:   {speedup:>6.2}x  (target >= {TARGET_SPEEDUP}x: {}; best runs {:.2}x; in CPU seconds {cpu_ratio:.2}x)",
            verdict(speedup >= TARGET_SPEEDUP),
            mlx.best().as_secs_f64() / mixq.best().as_secs_f64()
        );
        println!("mixq RSS / mlx-lm RSS:     {rss:>6.3}   (target <= {TARGET_RSS_FRACTION}: {})", verdict(rss <= TARGET_RSS_FRACTION));
    } else {
        println!(
            "mlx-lm ratios: not available (reference skipped); targets are >= {TARGET_SPEEDUP}x faster and <= {TARGET_RSS_FRACTION} of its peak RSS"
        );
    }
    println!(
        "(this bench's own peak RSS before spawning: {:.0} MiB; a child's ru_maxrss can include part of it, at most the copy child's {:.0} MiB)",
        mib(spawn_floor_kib),
        mib(copy.max_rss_kib())
    );
    println!(
        "(load average at start {load_at_start}, now {}: other work on this {}-CPU machine slows wall times; CPU seconds suffer less)",
        load_average(),
        std::thread::available_parallelism().map(usize::from).unwrap_or(0)
    );

    let pct = |d: Duration| 100.0 * d.as_secs_f64() / mixq_s;
    let ((decode, decode_cpu), (quant, quant_cpu), (hash, hash_cpu)) = (b.decode, b.quantize, b.hash);
    let q = quant.saturating_sub(decode);
    let rest = mixq.wall().saturating_sub(quant);
    println!(
        "\nwhere mixq's {mixq_s:.2} s ({:.2} s CPU) go; {:.0} Melem of experts, {:.1} MB of MXFP4 source; in-process, same threads:",
        mixq.cpu().as_secs_f64(),
        b.expert_elems as f64 / 1e6,
        mb(b.expert_bytes as u64)
    );
    let row = |what: &str, wall: Duration, cpu: Duration| {
        println!("  {what:<40} {:>6.2} s {:>5.1}%  {:>6.2} s CPU", wall.as_secs_f64(), pct(wall), cpu.as_secs_f64());
    };
    row("decode experts (a)", decode, decode_cpu);
    row("quantize experts ((b) - (a))", q, quant_cpu.saturating_sub(decode_cpu));
    let rest_cpu = mixq.cpu().saturating_sub(quant_cpu);
    row("remainder: write, fsync, hash, rest (*)", rest, rest_cpu);
    row("  of which sha256 of the output (d)", hash, hash_cpu);
    println!("  (*) also non-expert tensors (embeddings, attention), checkpoint validation, process start");
}

/// Total size of the plain files in `dir`, bytes.
fn folder_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
        .filter_map(|e| e.ok()?.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

/// Removes a folder if it exists.
fn remove_dir(dir: &Path) {
    if dir.exists() {
        std::fs::remove_dir_all(dir).unwrap_or_else(|e| panic!("removing {}: {e}", dir.display()));
    }
}

/// Bytes to MB (10^6).
fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

/// KiB to MiB.
fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}
