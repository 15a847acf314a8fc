//! Files only their owner may read: keys, TLS keys, device certificates. Created with mode
//! 0600 and never overwritten in place; reading refuses a file others can read, as OpenSSH
//! does, so a leaked key is noticed instead of silently used.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum FileError {
    #[error("{0} already exists")]
    AlreadyExists(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is readable by other users (mode {mode:o}); run: chmod 600 {path}")]
    InsecurePermissions { path: PathBuf, mode: u32 },
}

impl FileError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

pub fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> FileError + '_ {
    move |source| FileError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `contents` to a new file readable only by its owner; fails if `path` exists.
pub fn write_private_file(path: &Path, contents: &[u8]) -> Result<(), FileError> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|error| match error.kind() {
            std::io::ErrorKind::AlreadyExists => FileError::AlreadyExists(path.into()),
            _ => FileError::Io {
                path: path.into(),
                source: error,
            },
        })?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(io_error(path))
}

/// Replaces `path` atomically (write a private temporary file, then rename over), so a crash
/// leaves either the old contents or the new, never a torn file.
pub fn replace_private_file(path: &Path, contents: &[u8]) -> Result<(), FileError> {
    let temporary = path.with_extension(format!("tmp-{}", std::process::id()));
    let _ = fs::remove_file(&temporary);
    write_private_file(&temporary, contents)?;
    fs::rename(&temporary, path).map_err(|error| {
        let _ = fs::remove_file(&temporary);
        FileError::Io {
            path: path.into(),
            source: error,
        }
    })
}

/// Reads a file that must not be readable by group or others.
pub fn read_private_file(path: &Path) -> Result<String, FileError> {
    let metadata = fs::metadata(path).map_err(io_error(path))?;
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(FileError::InsecurePermissions {
            path: path.into(),
            mode,
        });
    }
    fs::read_to_string(path).map_err(io_error(path))
}
