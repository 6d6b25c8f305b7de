//! File names and the folders that hold them: the check that a name read from a file (an index's
//! shard, a manifest's entry) is a plain file name in one folder, so joining it to that folder
//! cannot reach outside it, and the folder of a path given on the command line.

use std::path::Path;

/// The folder holding `path`: its parent, or `.` for a bare file name.
pub fn folder_of(path: &Path) -> &Path {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// Why `name` cannot be a file name within one folder (empty, a NUL byte, a path separator or
/// an absolute path), if it cannot.
pub fn not_a_file_name(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("it is empty")
    } else if name.contains('\0') {
        Some("it contains a NUL byte")
    } else if name.contains('/') || name.contains('\\') || Path::new(name).is_absolute() {
        Some("it contains a path separator")
    } else {
        None
    }
}
