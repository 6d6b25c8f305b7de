//! Where a conversion writes before its output exists: a lock that keeps two conversions off one
//! output, a hidden partial folder beside the output, a journal of the shards finished in it
//! (size and sha256, recorded as each completes) that `--resume` trusts after re-hashing, and the
//! rename that makes the output appear only when complete.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{io, ConvertError};
use crate::writer::hash::sha256_file;

/// File name of the journal inside the partial folder.
pub const JOURNAL_FILE: &str = ".mixq-journal.json";
const JOURNAL_FORMAT: &str = "mixq-journal/1";

/// An exclusive lock on an output path, held by a lock file beside it; released on drop or death.
#[derive(Debug)]
pub struct OutputLock {
    path: PathBuf,
    /// Held only for its lock: closing it (after `Drop::drop` removed the path) releases it.
    _file: File,
}

impl OutputLock {
    /// Takes the lock for `out`, or fails naming the process that holds it.
    pub fn acquire(out: &Path, path: PathBuf) -> Result<OutputLock, ConvertError> {
        loop {
            let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io(&path))?;
            match file.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => {
                    let mut holder = String::new();
                    let _ = file.read_to_string(&mut holder);
                    let holder = holder.trim();
                    let holder = if holder.is_empty() { "another process".to_string() } else { format!("process {holder}") };
                    return Err(ConvertError::Busy { out: out.to_path_buf(), lock: path, holder });
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(io(&path)(e)),
            }
            // A finishing holder removes the lock file while it still holds the lock; if that
            // happened between our open and our lock, we hold a lock on a file nobody else sees.
            let same = match (std::fs::metadata(&path), file.metadata()) {
                (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
                _ => false,
            };
            if same {
                file.set_len(0).map_err(io(&path))?;
                file.write_all(format!("{}\n", std::process::id()).as_bytes()).map_err(io(&path))?;
                return Ok(OutputLock { path, _file: file });
            }
        }
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        // Removed while still locked (the file closes after this body), so no one can lock a
        // path that is about to disappear.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A finished shard as the journal records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardRecord {
    /// Bytes.
    pub size: u64,
    /// Hex sha256.
    pub sha256: String,
}

/// The journal: what the partial output was made from, and the shards finished so far.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Journal {
    format: String,
    /// What decides the bytes written: mixq version, source, recipe, quantizer, calibration, layout.
    inputs: BTreeMap<String, String>,
    shards: BTreeMap<String, ShardRecord>,
}

/// What opening the staging area found and did.
#[derive(Debug, Clone, Default)]
pub struct StagingReport {
    /// Stale partial folders of interrupted conversions that were removed, with their sizes.
    pub removed: Vec<(PathBuf, u64)>,
    /// Shards kept from an interrupted conversion (re-hashed and matching the journal).
    pub kept: BTreeMap<String, ShardRecord>,
    /// Journaled shards that no longer matched and will be written again.
    pub discarded: Vec<String>,
    /// Why a partial folder to resume had no usable journal (so nothing was kept).
    pub unverified: Option<String>,
}

/// The partial folder of one conversion, under its output lock.
#[derive(Debug)]
pub struct Staging {
    dir: PathBuf,
    journal: Journal,
    finished: bool,
    _lock: OutputLock,
}

/// The output's folder name (`mlx-model` for a path without one), as the card and the staging
/// files name it.
pub fn output_name(out: &Path) -> String {
    out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "mlx-model".into())
}

/// `.NAME.mixq-partial` beside `out`, and `.NAME.mixq-lock`.
fn sibling(out: &Path, suffix: &str) -> PathBuf {
    let name = output_name(out);
    mixq_loader::file_name::folder_of(out).join(format!(".{name}.{suffix}"))
}

/// Removes a file, or a folder with everything in it.
fn remove_path(p: &Path) -> Result<(), ConvertError> {
    if p.is_dir() { std::fs::remove_dir_all(p) } else { std::fs::remove_file(p) }.map_err(io(p))
}

/// Bytes under a folder (files only, not following links).
fn tree_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .filter_map(|e| e.ok())
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => tree_bytes(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

impl Staging {
    /// Locks `out`, then either resumes its partial folder (`resume` and a journal made from the
    /// same `inputs`) or removes any stale partial folders and starts an empty one.
    pub fn open(out: &Path, inputs: BTreeMap<String, String>, resume: bool) -> Result<(Staging, StagingReport), ConvertError> {
        let lock = OutputLock::acquire(out, sibling(out, "mixq-lock"))?;
        let dir = sibling(out, "mixq-partial");
        let mut report = StagingReport::default();
        let mut journal = Journal { format: JOURNAL_FORMAT.into(), inputs, shards: BTreeMap::new() };
        if resume && dir.is_dir() {
            // No readable journal (killed before its first write, or while finishing): nothing
            // was verified, so everything is written again.
            let previous = read_journal(&dir).unwrap_or_else(|why| {
                report.unverified = Some(why);
                Journal { format: JOURNAL_FORMAT.into(), inputs: journal.inputs.clone(), shards: BTreeMap::new() }
            });
            if let Some(key) = journal.inputs.keys().find(|k| previous.inputs.get(*k) != journal.inputs.get(*k)) {
                return Err(ConvertError::CannotResume {
                    partial: dir,
                    why: format!("it was made with a different {key}; rerun without --resume to start over"),
                });
            }
            for (name, rec) in previous.shards {
                let path = dir.join(&name);
                match sha256_file(&path) {
                    Ok((sha, size)) if sha == rec.sha256 && size == rec.size => {
                        report.kept.insert(name, rec);
                    }
                    _ => report.discarded.push(name),
                }
            }
            journal.shards = report.kept.clone();
            // Anything else in the folder (discarded shards, side files, a half-written journal)
            // is written again.
            for e in std::fs::read_dir(&dir).map_err(io(&dir))?.filter_map(|e| e.ok()) {
                let name = e.file_name().to_string_lossy().into_owned();
                if !journal.shards.contains_key(&name) && name != JOURNAL_FILE {
                    remove_path(&e.path())?;
                }
            }
        } else {
            // Under the lock, every partial folder of this output is left over from a conversion
            // that died (including the `-PID` ones of mixq before 0.1 resume support).
            let prefix = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let parent = dir.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
            if let Ok(entries) = std::fs::read_dir(&parent) {
                for e in entries.filter_map(|e| e.ok()) {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if name.starts_with(&prefix) && e.path().is_dir() {
                        let bytes = tree_bytes(&e.path());
                        std::fs::remove_dir_all(e.path()).map_err(io(&e.path()))?;
                        report.removed.push((e.path(), bytes));
                    }
                }
            }
        }
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let staging = Staging { dir, journal, finished: false, _lock: lock };
        staging.write_journal()?;
        Ok((staging, report))
    }

    /// The partial folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The journaled shards (name → size and sha256).
    pub fn shards(&self) -> &BTreeMap<String, ShardRecord> {
        &self.journal.shards
    }

    /// Records a finished, synced shard.
    pub fn record(&mut self, name: &str, record: ShardRecord) -> Result<(), ConvertError> {
        self.journal.shards.insert(name.to_string(), record);
        self.write_journal()
    }

    fn write_journal(&self) -> Result<(), ConvertError> {
        let path = self.dir.join(JOURNAL_FILE);
        let tmp = self.dir.join(format!("{JOURNAL_FILE}.tmp"));
        let text = serde_json::to_string_pretty(&self.journal).expect("the journal always serializes");
        let mut f = File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(text.as_bytes()).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))
    }

    /// Moves the finished partial folder to `out` (replacing what is there) and releases the lock.
    pub fn finish(mut self, out: &Path) -> Result<(), ConvertError> {
        let journal = self.dir.join(JOURNAL_FILE);
        std::fs::remove_file(&journal).map_err(io(&journal))?;
        if out.exists() {
            remove_path(out)?;
        }
        crate::writer::fault::point("rename");
        std::fs::rename(&self.dir, out).map_err(io(out))?;
        if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
            let _ = File::open(parent).and_then(|d| d.sync_all());
        }
        self.finished = true;
        Ok(())
    }
}

impl Drop for Staging {
    /// A conversion that failed keeps its partial folder only if it holds finished shards to resume.
    fn drop(&mut self) {
        if !self.finished && self.journal.shards.is_empty() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The journal of a partial folder, or why there is none to trust.
fn read_journal(dir: &Path) -> Result<Journal, String> {
    let path = dir.join(JOURNAL_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{} cannot be read ({e})", path.display()))?;
    let journal: Journal = serde_json::from_str(&text).map_err(|e| format!("{} is not valid ({e})", path.display()))?;
    if journal.format != JOURNAL_FORMAT {
        return Err(format!("{} has format {:?}, expected {JOURNAL_FORMAT:?}", path.display(), journal.format));
    }
    Ok(journal)
}

/// Bytes free for an unprivileged writer on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statvfs.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(recipe: &str) -> BTreeMap<String, String> {
        [("recipe".to_string(), recipe.to_string()), ("source".to_string(), "s".to_string())].into_iter().collect()
    }

    #[test]
    fn a_second_lock_on_one_output_is_refused_and_the_lock_file_goes_with_the_holder() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("m");
        let (first, _) = Staging::open(&out, inputs("a"), false).unwrap();
        let e = Staging::open(&out, inputs("a"), false).unwrap_err();
        assert!(e.to_string().contains(&format!("process {}", std::process::id())), "{e}");
        drop(first);
        assert!(!tmp.path().join(".m.mixq-lock").exists());
        assert!(!tmp.path().join(".m.mixq-partial").exists(), "an empty partial folder is not kept");
        Staging::open(&out, inputs("a"), false).unwrap();
    }

    #[test]
    fn resume_keeps_matching_shards_and_refuses_other_inputs() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("m");
        let (mut s, _) = Staging::open(&out, inputs("a"), false).unwrap();
        for (name, body) in [("x.safetensors", b"xx".as_slice()), ("y.safetensors", b"yyy")] {
            std::fs::write(s.dir().join(name), body).unwrap();
            let (sha256, size) = sha256_file(&s.dir().join(name)).unwrap();
            s.record(name, ShardRecord { size, sha256 }).unwrap();
        }
        let dir = s.dir().to_path_buf();
        drop(s);
        assert!(dir.is_dir(), "a partial folder with finished shards is kept");
        std::fs::write(dir.join("y.safetensors"), b"yyz").unwrap();
        let e = Staging::open(&out, inputs("b"), true).unwrap_err();
        assert!(e.to_string().contains("different recipe"), "{e}");
        let (s, report) = Staging::open(&out, inputs("a"), true).unwrap();
        assert_eq!(report.kept.keys().collect::<Vec<_>>(), ["x.safetensors"]);
        assert_eq!(report.discarded, ["y.safetensors"]);
        drop(s);
        let (s, report) = Staging::open(&out, inputs("a"), false).unwrap();
        assert_eq!(report.removed.len(), 1, "without --resume the stale folder is removed and reported");
        assert!(report.kept.is_empty());
        drop(s);

        // A partial folder whose journal is gone (killed before its first write) is started over.
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("x.safetensors"), b"xx").unwrap();
        let (s, report) = Staging::open(&out, inputs("a"), true).unwrap();
        assert!(report.unverified.as_deref().is_some_and(|w| w.contains("cannot be read")), "{report:?}");
        assert!(report.kept.is_empty() && !s.dir().join("x.safetensors").exists());
    }

    #[test]
    fn free_space_is_read() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(free_bytes(tmp.path()).unwrap() > 0);
    }
}
