//! Small filesystem helpers shared by the WAL and the snapshot store.

use std::fs::{self, File};
use std::io;
use std::path::Path;

/// Makes creations, renames and deletions in `dir` durable; without it a crash can forget
/// a file whose contents were fsynced.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates `dir` (and parents) if missing, and makes the new directory entry durable.
pub(crate) fn ensure_dir(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::create_dir_all(dir)?;
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    sync_dir(parent)
}

/// Removes files in `dir` whose name ends with `suffix`: leftovers of writes that were
/// interrupted before their rename, which are never part of the durable state.
pub(crate) fn remove_with_suffix(dir: &Path, suffix: &str) -> io::Result<usize> {
    let mut removed = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.ends_with(suffix) && entry.file_type()?.is_file() {
            fs::remove_file(entry.path())?;
            removed += 1;
        }
    }
    if removed > 0 {
        sync_dir(dir)?;
    }
    Ok(removed)
}

/// Parses `{a:016x}-{b:016x}{suffix}`, the naming scheme of WAL segments and snapshots that
/// makes lexical order equal numeric order.
pub(crate) fn parse_pair_name(name: &str, suffix: &str) -> Option<(u64, u64)> {
    let stem = name.strip_suffix(suffix)?;
    let (a, b) = stem.split_once('-')?;
    let hex = |s: &str| {
        if s.len() == 16 && s.bytes().all(|c| c.is_ascii_hexdigit()) {
            u64::from_str_radix(s, 16).ok()
        } else {
            None
        }
    };
    Some((hex(a)?, hex(b)?))
}

pub(crate) fn u32_at(buf: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[at..at + 4]);
    u32::from_le_bytes(b)
}

pub(crate) fn u64_at(buf: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_le_bytes(b)
}
