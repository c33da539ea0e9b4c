//! Directories only this user may change: the compiled-component cache (what is kept there is
//! code that runs) and the admin socket's directory (whoever can replace the socket can take
//! the deploys meant for a host). Both are created private and checked before use, since an
//! existing directory may have been made by someone else.

use std::path::Path;

/// Creates `dir` (and its parents) readable and writable by this user alone.
#[cfg(unix)]
pub fn create(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

#[cfg(not(unix))]
pub fn create(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)
}

/// Why a directory may not be trusted.
#[derive(Debug, thiserror::Error)]
pub enum NotPrivate {
    /// It could not be looked at.
    #[error("cannot check it: {0}")]
    Io(#[from] std::io::Error),
    /// It is something else (or a symbolic link to a directory).
    #[error("it is not a directory")]
    NotADirectory,
    /// Another user owns it.
    #[error("it belongs to user {owner} and this process runs as {user}")]
    Owner {
        /// Its owner.
        owner: u32,
        /// This process's effective user.
        user: u32,
    },
    /// Its group or others may write to it.
    #[error("others may write to it (mode {mode:o})")]
    Writable {
        /// Its permission bits.
        mode: u32,
    },
}

/// Checks that `dir` is a directory of this user's that nobody else may write to.
#[cfg(unix)]
pub fn check(dir: &Path) -> Result<(), NotPrivate> {
    use std::os::unix::fs::MetadataExt;
    let metadata = std::fs::symlink_metadata(dir)?;
    if !metadata.is_dir() {
        return Err(NotPrivate::NotADirectory);
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let user = unsafe { libc::geteuid() };
    if metadata.uid() != user {
        return Err(NotPrivate::Owner {
            owner: metadata.uid(),
            user,
        });
    }
    if metadata.mode() & 0o022 != 0 {
        return Err(NotPrivate::Writable {
            mode: metadata.mode() & 0o777,
        });
    }
    Ok(())
}

#[cfg(not(unix))]
pub fn check(_: &Path) -> Result<(), NotPrivate> {
    Ok(())
}
