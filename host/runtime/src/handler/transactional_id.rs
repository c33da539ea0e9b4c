//! The Kafka `transactional.id` of an exactly-once handler's member.
//!
//! Why it matters: Kafka lets one producer per transactional id commit. A host that starts with
//! the id of one that died fences the dead one's producer, and the broker aborts the dead one's
//! open transaction at once instead of after `transaction.timeout.ms`; two live members with
//! one id would fence each other in turn. So the id must be the same for a restarted host and
//! different for two hosts running at once: it is made of the group, this machine's name and
//! a slot, the lowest number whose lock file no live process of this user holds (a lock dies
//! with its process, so `kill -9` frees it). A host restarted on its machine takes its old
//! slot; a second host beside it takes the next.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::PathBuf;

use switchyard_broker::BrokerError;

/// Slots tried before giving up: more handlers of one group on one machine than this is a
/// mistake, not a deployment.
const MAX_SLOTS: u32 = 256;

/// A transactional id, held for as long as this value lives.
pub(super) struct TransactionalId {
    /// The id.
    pub(super) id: String,
    /// Holds the slot (its lock is released when the file closes).
    _lock: File,
}

/// Takes the lowest free slot of `group` on this machine.
pub(super) fn take(group: &str) -> Result<TransactionalId, BrokerError> {
    let dir = crate::admin::user_runtime_dir().join("transactional-ids");
    let unusable = |what: String, source: std::io::Error| {
        BrokerError::config(format!(
            "{what}: an exactly-once handler keeps its transactional id there (set \
             XDG_RUNTIME_DIR to a directory this user may write)"
        ))
        .with_source(source)
    };
    crate::private_dir::create(&dir)
        .map_err(|e| unusable(format!("cannot create {}", dir.display()), e))?;
    let host = host_name();
    // Kafka takes any string; the file name keeps to what every file system takes.
    let file_stem: String = group
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let digest = {
        use sha2::Digest;
        hex::encode(&sha2::Sha256::digest(group.as_bytes())[..6])
    };
    for slot in 0..MAX_SLOTS {
        let path: PathBuf = dir.join(format!("{file_stem}-{digest}.{slot}.lock"));
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| unusable(format!("cannot open {}", path.display()), e))?;
        match file.try_lock() {
            Ok(()) => {
                return Ok(TransactionalId {
                    id: format!("switchyard.{group}.{host}.{slot}"),
                    _lock: file,
                });
            }
            Err(TryLockError::WouldBlock) => continue,
            Err(TryLockError::Error(e)) => {
                return Err(unusable(format!("cannot lock {}", path.display()), e));
            }
        }
    }
    Err(BrokerError::config(format!(
        "{MAX_SLOTS} hosts of group {group:?} already run exactly-once on this machine"
    )))
}

/// This machine's name, as `uname -n` says it; `localhost` if it has none.
fn host_name() -> String {
    let mut name = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that much.
    let result = unsafe { libc::gethostname(name.as_mut_ptr().cast(), name.len()) };
    let length = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    match std::str::from_utf8(&name[..length]) {
        Ok(host) if result == 0 && !host.is_empty() => host.to_string(),
        _ => "localhost".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_slot_is_skipped_and_a_freed_one_taken_again() {
        let group = format!("slot-test-{}", std::process::id());
        let first = take(&group).unwrap();
        let second = take(&group).unwrap();
        assert!(first.id.ends_with(".0"), "{}", first.id);
        assert!(second.id.ends_with(".1"), "{}", second.id);
        assert!(first.id.starts_with(&format!("switchyard.{group}.")));
        drop(first);
        // The first slot's holder is gone (as a killed host's lock goes with it).
        assert!(take(&group).unwrap().id.ends_with(".0"));
    }
}
