//! Conversion progress on stderr: indicatif bars on a terminal, plain lines otherwise.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use mixq_quantizer::Progress;

/// Reports conversion progress on stderr.
pub struct StderrProgress {
    bar: Option<ProgressBar>,
    start: Instant,
    total: AtomicU64,
    done: AtomicU64,
    tensors: AtomicUsize,
    total_tensors: AtomicUsize,
    last_line: Mutex<Instant>,
    /// No bar or progress lines.
    no_progress: bool,
    /// No notes either.
    quiet: bool,
}

impl StderrProgress {
    /// A bar when stderr is a terminal, plain lines every few seconds otherwise; none of it with
    /// `no_progress` (`--json`), and no notes either with `quiet` (`--quiet`). Warnings always show.
    pub fn new(no_progress: bool, quiet: bool) -> Self {
        let no_progress = no_progress || quiet;
        let bar = (!no_progress && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}",
                )
                .expect("valid template"),
            );
            bar
        });
        StderrProgress {
            bar,
            start: Instant::now(),
            total: AtomicU64::new(0),
            done: AtomicU64::new(0),
            tensors: AtomicUsize::new(0),
            total_tensors: AtomicUsize::new(0),
            last_line: Mutex::new(Instant::now()),
            no_progress,
            quiet,
        }
    }

    /// Clears the bar.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }

    fn line(&self, force: bool) {
        if self.no_progress || self.bar.is_some() {
            return;
        }
        let mut last = self.last_line.lock().unwrap_or_else(|e| e.into_inner());
        if !force && last.elapsed().as_secs_f64() < 2.0 {
            return;
        }
        *last = Instant::now();
        let (done, total) = (self.done.load(Ordering::Relaxed), self.total.load(Ordering::Relaxed));
        let secs = self.start.elapsed().as_secs_f64().max(1e-9);
        let rate = done as f64 / secs;
        let eta = if rate > 0.0 { (total.saturating_sub(done)) as f64 / rate } else { 0.0 };
        eprintln!(
            "convert: {:.1}/{:.1} MiB ({:.0}%), {}/{} tensors, {:.1} MiB/s, ETA {:.0}s",
            done as f64 / 1048576.0,
            total as f64 / 1048576.0,
            100.0 * done as f64 / total.max(1) as f64,
            self.tensors.load(Ordering::Relaxed),
            self.total_tensors.load(Ordering::Relaxed),
            rate / 1048576.0,
            eta
        );
    }
}

impl StderrProgress {
    /// A line on stderr, above the bar when there is one.
    fn say(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }
}

impl Progress for StderrProgress {
    fn begin(&self, source_bytes: u64, tensors: usize) {
        self.total.store(source_bytes, Ordering::Relaxed);
        self.total_tensors.store(tensors, Ordering::Relaxed);
        if let Some(bar) = &self.bar {
            bar.set_length(source_bytes);
        }
        self.line(true);
    }

    fn advance(&self, source_bytes: u64) {
        self.done.fetch_add(source_bytes, Ordering::Relaxed);
        if let Some(bar) = &self.bar {
            bar.inc(source_bytes);
        }
        self.line(false);
    }

    fn tensor_done(&self, name: &str) {
        let n = self.tensors.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(bar) = &self.bar {
            bar.set_message(format!("{n}/{} {name}", self.total_tensors.load(Ordering::Relaxed)));
        }
    }

    fn phase(&self, what: &str) {
        if let Some(bar) = &self.bar {
            bar.set_message(what.to_string());
        } else if !self.no_progress {
            self.line(true);
            eprintln!("convert: {what}");
        }
    }

    fn notice(&self, what: &str) {
        if !self.quiet {
            self.say(&format!("convert: {what}"));
        }
    }

    fn warning(&self, what: &str) {
        self.say(&format!("warning: {what}"));
    }
}

/// Progress over a count (tokens of validate and calibrate, units of sensitivity): a bar on a
/// terminal, else a line every 2 s.
pub struct CountProgress {
    what: &'static str,
    unit: &'static str,
    quiet: bool,
    bar: Option<indicatif::ProgressBar>,
    start: std::time::Instant,
    last: std::sync::Mutex<std::time::Instant>,
}

impl CountProgress {
    /// A reporter for the job named `what` counting `unit`s; `quiet` silences it.
    pub fn new(what: &'static str, unit: &'static str, quiet: bool) -> Self {
        let bar = (!quiet && std::io::IsTerminal::is_terminal(&std::io::stderr())).then(|| {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(&format!("{{spinner}} [{{elapsed_precise}}] {{wide_bar}} {{pos}}/{{len}} {unit} {{per_sec}} ETA {{eta}}"))
                    .expect("valid template"),
            );
            bar
        });
        let now = std::time::Instant::now();
        CountProgress { what, unit, quiet, bar, start: now, last: std::sync::Mutex::new(now) }
    }

    /// `done` of `total` are processed.
    pub fn update(&self, done: usize, total: usize) {
        if let Some(bar) = &self.bar {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        } else if !self.quiet {
            let mut l = self.last.lock().unwrap_or_else(|e| e.into_inner());
            if l.elapsed().as_secs_f64() >= 2.0 || done == total {
                *l = std::time::Instant::now();
                let rate = done as f64 / self.start.elapsed().as_secs_f64().max(1e-9);
                eprintln!("{}: {done}/{total} {u}, {rate:.1} {u}/s, ETA {:.0}s", self.what, (total - done) as f64 / rate.max(1e-9), u = self.unit);
            }
        }
    }

    /// Clears the bar.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
