//! Noticing a source checkpoint that changes while it is being converted: the size and
//! modification time of every file the conversion reads, taken at the start and compared again.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use mixq_loader::Checkpoint;

use crate::error::{io, ConvertError};
use crate::writer::hash::sha256_hex;

/// Size and modification time of one source file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
}

impl Stamp {
    fn of(path: &Path) -> std::io::Result<Stamp> {
        let m = std::fs::metadata(path)?;
        Ok(Stamp { len: m.len(), modified: m.modified().ok() })
    }
}

/// The stamps of every file a conversion reads from its source.
#[derive(Debug, Clone)]
pub struct SourceWatch {
    files: Vec<(PathBuf, Stamp)>,
}

impl SourceWatch {
    /// Stamps config.json, the index, every shard and the side files present in `ckpt`'s folder.
    pub fn of(ckpt: &Checkpoint) -> Result<SourceWatch, ConvertError> {
        let dir = ckpt.dir();
        let mut paths: Vec<PathBuf> = vec![dir.join("config.json")];
        paths.extend([mixq_loader::INDEX_FILE].iter().chain(mixq_loader::source::SIDE_FILES).map(|n| dir.join(n)).filter(|p| p.is_file()));
        paths.extend(ckpt.shards().iter().map(|s| s.path().to_path_buf()));
        let files = paths.into_iter().map(|p| Stamp::of(&p).map(|s| (p.clone(), s)).map_err(io(&p))).collect::<Result<_, _>>()?;
        Ok(SourceWatch { files })
    }

    /// Fails naming the first file whose size or modification time is no longer what it was.
    pub fn check(&self) -> Result<(), ConvertError> {
        for (path, before) in &self.files {
            let what = match Stamp::of(path) {
                Err(e) => format!("it can no longer be read ({e})"),
                Ok(now) if now.len != before.len => format!("its size went from {} to {} bytes", before.len, now.len),
                Ok(now) if now.modified != before.modified => "it was modified".to_string(),
                Ok(_) => continue,
            };
            return Err(ConvertError::SourceChanged { path: path.clone(), what });
        }
        Ok(())
    }

    /// A digest of the stamps (file names, sizes, times): equal digests mean an unchanged source.
    pub fn digest(&self) -> String {
        let mut text = String::new();
        for (path, s) in &self.files {
            let t = s.modified.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok()).map(|d| d.as_nanos()).unwrap_or(0);
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            text.push_str(&format!("{name}\t{}\t{t}\n", s.len));
        }
        sha256_hex(text.as_bytes())
    }
}
