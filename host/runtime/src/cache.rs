//! The on-disk cache of compiled components, and why it trusts only what it wrote.
//!
//! A cached artifact is native code: wasmtime maps it and runs it, checking only its header.
//! A file planted in the cache, or one damaged on disk, would therefore run as the host (or
//! crash it). So the cache lives only in a directory of the user's own that nobody else may
//! write, every artifact carries an HMAC-SHA-256 of its name and bytes under a key only this user
//! can read (created on first use beside the artifacts), and an artifact whose tag does not match is compiled
//! again, with a warning, instead of being loaded. The bytes checked are the bytes
//! deserialized: the file is read once, checked, then handed to wasmtime.

use std::io::Write;
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use wasmtime::Engine;
use wasmtime::component::Component;

/// What every artifact file starts with, before its tag.
const MAGIC: &[u8; 8] = b"SYCWASM1";
const TAG_BYTES: usize = 32;
const KEY_FILE: &str = "artifact-key";

/// Why the cache cannot be used; the runtime then compiles every component at start.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// No directory of the user's own to put it in.
    #[error(
        "no cache directory: neither SWITCHYARD_CACHE_DIR, XDG_CACHE_HOME nor HOME is set \
         (set one, or pass --cache-dir)"
    )]
    NoDirectory,
    /// The directory belongs to someone else or others may write to it.
    #[error(
        "{path} is not safe for compiled code: {reason} (use a directory only you can write, \
         such as ~/.cache/switchyard/compiled)"
    )]
    Unsafe {
        /// The directory.
        path: PathBuf,
        /// What is wrong with it (its text is part of this error's, so it is not also a
        /// `source`).
        reason: crate::private_dir::NotPrivate,
    },
    /// Reading or writing the directory or its key failed.
    #[error("{what}: {error}")]
    Io {
        /// What was being done.
        what: String,
        /// The error (in the message, so not also a `source`, which `{:#}` would print twice).
        error: std::io::Error,
    },
}

/// An open cache directory and its key.
pub struct ArtifactCache {
    dir: PathBuf,
    key: [u8; 32],
}

impl std::fmt::Debug for ArtifactCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArtifactCache")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl ArtifactCache {
    /// Opens (creating it, private to the user) the cache in `dir`.
    pub fn open(dir: &Path) -> Result<Self, CacheError> {
        let io = |what: String| move |error| CacheError::Io { what, error };
        crate::private_dir::create(dir).map_err(io(format!("creating {}", dir.display())))?;
        crate::private_dir::check(dir).map_err(|reason| CacheError::Unsafe {
            path: dir.to_path_buf(),
            reason,
        })?;
        let key = load_or_create_key(&dir.join(KEY_FILE))
            .map_err(io(format!("the key in {}", dir.display())))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            key,
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the artifact named `name` lives.
    pub fn artifact_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.cwasm"))
    }

    /// The tag of `artifact` stored as `name`: the name is signed too, so one genuine
    /// artifact cannot stand in for another.
    fn tag(&self, name: &str, artifact: &[u8]) -> Hmac<Sha256> {
        // HMAC takes keys of any length; 32 bytes is never refused.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.key)
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        mac.update(&(name.len() as u64).to_le_bytes());
        mac.update(name.as_bytes());
        mac.update(artifact);
        mac
    }

    /// The component cached under `name`, if there is one this cache wrote; anything else
    /// there (missing, foreign, damaged, from another engine) is `None`, and all but a
    /// missing file are logged.
    pub fn load(&self, engine: &Engine, name: &str) -> Option<Component> {
        let path = self.artifact_path(name);
        let file = match std::fs::read(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(
                    "cannot read cached artifact {}: {e}; compiling again",
                    path.display()
                );
                return None;
            }
        };
        let signed = file
            .strip_prefix(MAGIC.as_slice())
            .filter(|rest| rest.len() > TAG_BYTES)
            .map(|rest| rest.split_at(TAG_BYTES));
        let Some((tag, artifact)) = signed else {
            tracing::warn!(
                "{} is not signed by this cache (an earlier switchyard's, damaged, or not \
                 switchyard's); compiling again and replacing it",
                path.display()
            );
            return None;
        };
        if self.tag(name, artifact).verify_slice(tag).is_err() {
            tracing::warn!(
                "{} does not carry this cache's signature (damaged, or written by someone \
                 else); compiling again and replacing it",
                path.display()
            );
            return None;
        }
        // SAFETY: these bytes are exactly the ones this cache serialized with
        // `Component::serialize` (the HMAC under the user's key, checked just above, says so),
        // for an engine with the same compatibility hash (part of `name`); wasmtime checks
        // the header again and refuses an artifact from a different engine.
        match unsafe { Component::deserialize(engine, artifact) } {
            Ok(component) => Some(component),
            Err(e) => {
                tracing::warn!(
                    "cached artifact {} is unusable ({e}); compiling again",
                    path.display()
                );
                None
            }
        }
    }

    /// Stores `component` under `name`, signed.
    pub fn store(&self, name: &str, component: &Component) -> std::io::Result<()> {
        let artifact = component.serialize().map_err(std::io::Error::other)?;
        let tag = self.tag(name, &artifact).finalize().into_bytes();
        // Write then rename, so a concurrent reader never sees half a file.
        let mut temp = tempfile::NamedTempFile::new_in(&self.dir)?;
        temp.write_all(MAGIC)?;
        temp.write_all(&tag)?;
        temp.write_all(&artifact)?;
        temp.persist(self.artifact_path(name))
            .map_err(|e| e.error)?;
        Ok(())
    }
}

fn load_or_create_key(path: &Path) -> std::io::Result<[u8; 32]> {
    let mut key = [0u8; 32];
    match std::fs::read(path) {
        Ok(bytes) if bytes.len() == key.len() => {
            key.copy_from_slice(&bytes);
            return Ok(key);
        }
        Ok(_) => {
            // A key of the wrong size cannot have signed anything here: start afresh (every
            // artifact signed with the old one is compiled again).
            std::fs::remove_file(path)?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    getrandom::fill(&mut key).map_err(std::io::Error::other)?;
    // Written whole under a temporary name (private to the user), then linked into place
    // only if no other process got there first: a reader never sees half a key.
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut temp = tempfile::NamedTempFile::new_in(dir)?;
    temp.write_all(&key)?;
    match temp.persist_noclobber(path) {
        Ok(_) => Ok(key),
        Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => {
            let bytes = std::fs::read(path)?;
            bytes
                .try_into()
                .map_err(|_| std::io::Error::other(format!("{} is not a key", path.display())))
        }
        Err(e) => Err(e.error),
    }
}
