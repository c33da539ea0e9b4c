//! The wasmtime engine, and loading components through the compile cache.
//!
//! Cranelift needs tens of seconds for the classifier (tract is large); loading the compiled
//! artifact takes tens of milliseconds. So every component is compiled once and the artifact
//! stored in the cache ([`super::cache`], which trusts only artifacts it signed), keyed by the
//! SHA-256 of the `.wasm` and of the engine's compatibility hash (wasmtime version, compiler
//! settings, CPU features): a changed component or a new wasmtime compiles again, nothing else
//! does.
//!
//! Instances come from the pooling allocator: slots are reserved once and reused, so replacing
//! a trapped instance or starting a worker costs microseconds, not page faults.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::RuntimeError;
use super::cache::ArtifactCache;

/// How often the epoch advances; calls are interrupted (to yield, or to stop at their
/// deadline) at this granularity.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Sizes the engine's instance pool.
#[derive(Debug, Clone, Copy)]
pub struct PoolSize {
    /// Component instances alive at once (workers, commands, and replacements in flight).
    pub instances: u32,
    /// The largest linear memory any component may grow to, in bytes.
    pub max_memory_bytes: usize,
}

/// Builds the engine every component shares.
pub fn engine(pool: PoolSize) -> Result<Engine, RuntimeError> {
    let mut config = Config::new();
    config.wasm_component_model(true);
    config.epoch_interruption(true);
    config.cranelift_opt_level(wasmtime::OptLevel::Speed);

    let instances = pool.instances.max(4);
    let mut pooling = PoolingAllocationConfig::default();
    // A Rust component holds a handful of core instances (its module plus adapter shims), and
    // each has a few tables; the classifier's function table is large because tract is.
    pooling
        .total_component_instances(instances)
        .total_core_instances(instances * 8)
        .total_memories(instances * 2)
        .total_tables(instances * 8)
        .total_stacks(instances)
        .table_elements(200_000)
        .max_core_instance_size(8 << 20)
        .max_memory_size(pool.max_memory_bytes);
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pooling));
    Engine::new(&config).map_err(|e| RuntimeError::Engine(format!("{e:#}")))
}

/// Advances the engine's epoch every [`EPOCH_TICK`] until dropped.
pub struct EpochTicker {
    stop: Arc<AtomicBool>,
}

impl EpochTicker {
    /// Starts a thread that ticks `engine`'s epoch.
    pub fn start(engine: &Engine) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let weak = engine.weak();
        let flag = stop.clone();
        std::thread::Builder::new()
            .name("switchyard-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    match weak.upgrade() {
                        Some(engine) => engine.increment_epoch(),
                        None => break,
                    }
                }
            })
            .ok();
        Self { stop }
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The default cache directory: `$SWITCHYARD_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/switchyard/compiled`, else `$HOME/.cache/switchyard/compiled`; `None`
/// without any of them. Never a shared directory such as the system's temp dir: compiled
/// artifacts are native code (see [`super::cache`]).
pub fn default_cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("SWITCHYARD_CACHE_DIR") {
        return Some(PathBuf::from(dir));
    }
    crate::user_cache_dir("compiled")
}

/// Whether a component came from the cache or was compiled now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Loaded a compiled artifact.
    Hit,
    /// Compiled (and stored for next time).
    Compiled,
}

/// A compiled component and where it came from.
pub struct Compiled {
    /// The component.
    pub component: Component,
    /// Compiled now or loaded from the cache.
    pub outcome: CacheOutcome,
    /// Which build of it this is: `sha256:` and the first 12 hex digits of the `.wasm`'s
    /// SHA-256, so a dead letter or a log names the exact version that failed.
    pub version: String,
}

/// Which build a `.wasm` is, as [`Compiled::version`] names it, without compiling it: how a
/// deploy tells a changed file from an unchanged one.
pub fn version_of(wasm_path: &Path) -> Result<String, RuntimeError> {
    Ok(version_of_digest(&Sha256::digest(read_wasm(wasm_path)?)))
}

fn read_wasm(wasm_path: &Path) -> Result<Vec<u8>, RuntimeError> {
    std::fs::read(wasm_path).map_err(|e| RuntimeError::Component {
        path: wasm_path.to_path_buf(),
        message: format!("cannot read it: {e}"),
    })
}

fn version_of_digest(digest: &[u8]) -> String {
    format!("sha256:{}", &hex::encode(digest)[..12])
}

/// Loads a component, compiling it only if `cache` has no artifact of its own for it.
pub fn load_component(
    engine: &Engine,
    wasm_path: &Path,
    cache: Option<&ArtifactCache>,
) -> Result<Compiled, RuntimeError> {
    let bytes = read_wasm(wasm_path)?;
    check_is_component(&bytes).map_err(|message| RuntimeError::Component {
        path: wasm_path.to_path_buf(),
        message,
    })?;

    let mut engine_hash = std::collections::hash_map::DefaultHasher::new();
    engine
        .precompile_compatibility_hash()
        .hash(&mut engine_hash);
    let digest = Sha256::digest(&bytes);
    let version = version_of_digest(&digest);
    let mut key = Sha256::new();
    key.update(engine_hash.finish().to_le_bytes());
    key.update(digest);
    let name = hex::encode(key.finalize());

    if let Some(component) = cache.and_then(|cache| cache.load(engine, &name)) {
        return Ok(Compiled {
            component,
            outcome: CacheOutcome::Hit,
            version,
        });
    }

    // Cranelift takes tens of seconds for a large component on a small machine: say so, so a
    // first run does not look hung, and say how long it took.
    tracing::info!(
        "compiling {} ({} KiB) to native code{}",
        wasm_path.display(),
        bytes.len() / 1024,
        match cache {
            Some(cache) => format!(
                ", once: large components take up to a minute; the result is cached in {}",
                cache.dir().display()
            ),
            None => ": large components take up to a minute (no compile cache)".to_string(),
        }
    );
    let started = std::time::Instant::now();
    let component = Component::new(engine, &bytes).map_err(|e| RuntimeError::Component {
        path: wasm_path.to_path_buf(),
        message: format!("it does not compile: {e:#}"),
    })?;
    tracing::info!(
        "compiled {} in {:.1} s",
        wasm_path.display(),
        started.elapsed().as_secs_f64()
    );
    if let Some(cache) = cache
        && let Err(e) = cache.store(&name, &component)
    {
        // Only costs time on the next start.
        tracing::warn!(
            "cannot cache the compiled component in {}: {e}",
            cache.dir().display()
        );
    }
    Ok(Compiled {
        component,
        outcome: CacheOutcome::Compiled,
        version,
    })
}

/// Tells a component apart from a core module or something else, with the fix for each.
pub(crate) fn check_is_component(bytes: &[u8]) -> Result<(), String> {
    const COMPONENT_VERSION: [u8; 4] = [0x0d, 0x00, 0x01, 0x00];
    const CORE_VERSION: [u8; 4] = [0x01, 0x00, 0x00, 0x00];
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(
            "it is not a WebAssembly file (no \\0asm header): point `wasm` at the \
                    .wasm that `cargo build --target wasm32-wasip2` produced"
                .into(),
        );
    }
    match bytes[4..8].try_into() {
        Ok(COMPONENT_VERSION) => Ok(()),
        Ok(CORE_VERSION) => Err(
            "it is a core WebAssembly module, not a component: build it \
                                 with --target wasm32-wasip2, or wrap it with `wasm-tools \
                                 component new`"
                .into(),
        ),
        _ => Err(format!(
            "unsupported WebAssembly version/layer {:02x?}: rebuild it with a current \
             toolchain for wasm32-wasip2",
            &bytes[4..8]
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_components_and_explains_the_rest() {
        assert!(check_is_component(b"\0asm\x0d\0\x01\0rest").is_ok());
        let core = check_is_component(b"\0asm\x01\0\0\0").unwrap_err();
        assert!(core.contains("core WebAssembly module"), "{core}");
        let junk = check_is_component(b"#!/bin/sh\necho").unwrap_err();
        assert!(junk.contains("not a WebAssembly file"), "{junk}");
        assert!(check_is_component(b"\0asm").is_err());
    }
}
