//! ONNX Runtime, natively, loaded at run time (the `ort` crate's `load-dynamic`).
//!
//! Why: on LeNet-5 here it computes an image in about 55 µs where native tract needs about 80
//! (see BENCHMARKS.md), and it is the engine most ONNX users already trust. Why loaded at run
//! time: its prebuilt binaries cannot be downloaded by `ort`'s build script on machines like ours,
//! and a fresh clone must build and run without it. The library comes from the `onnxruntime`
//! wheel on PyPI, which carries a self-contained `libonnxruntime.so`:
//! `switchyard install-onnxruntime` fetches the wheel with pip and keeps only that file, in
//! `~/.cache/switchyard/onnxruntime-VERSION/`. `SWITCHYARD_ONNXRUNTIME` names another copy.
//!
//! Nothing is loaded from a directory others can write to: the library is native code.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};

use ort::session::Session as OrtSession;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::{DynValue, Tensor as OrtTensor, TensorElementType, ValueType};

use super::{Graph, NnError, Session, Tensor, TensorType};

/// The ONNX Runtime release switchyard installs and is tested with.
pub const VERSION: &str = "1.32.0";

/// The environment variable that names a `libonnxruntime` to use instead of the installed one.
pub const LIBRARY_ENV: &str = "SWITCHYARD_ONNXRUNTIME";

/// Why ONNX Runtime could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// There is no home or cache directory to install into.
    #[error("no directory to install into: set HOME or XDG_CACHE_HOME")]
    NoCacheDir,
    /// A step could not run or failed.
    #[error("{step} failed: {detail}")]
    Step {
        /// What was being done.
        step: String,
        /// What went wrong, with the fix where there is one.
        detail: String,
    },
    /// Files could not be written or moved.
    #[error("{what}: {error}")]
    Io {
        /// What was being done.
        what: String,
        /// The I/O error (in the message, so not also a `source`, which `{:#}` would print
        /// twice).
        error: std::io::Error,
    },
}

/// Why ONNX Runtime cannot be used in this process, and how to make it usable.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Unavailable {
    /// No library to load.
    #[error(
        "ONNX Runtime is not installed: `switchyard install-onnxruntime` fetches {VERSION} from \
         PyPI (or set {LIBRARY_ENV} to a libonnxruntime.so)"
    )]
    NotInstalled,
    /// The library is there but does not load.
    #[error("cannot load {}: {error}", path.display())]
    Load {
        /// The library.
        path: PathBuf,
        /// What loading it said (in the message, so not also a `source`).
        error: Arc<ort::LoadDynamicError>,
    },
    /// The library loaded but its environment does not start.
    #[error("cannot start ONNX Runtime from {}: {error}", path.display())]
    Start {
        /// The library.
        path: PathBuf,
        /// What ONNX Runtime said.
        error: Arc<ort::Error>,
    },
}

/// Where `install` puts the library: `$XDG_CACHE_HOME/switchyard` or `~/.cache/switchyard`,
/// never the shared temp directory.
pub fn install_dir() -> Option<PathBuf> {
    crate::user_cache_dir(&format!("onnxruntime-{VERSION}"))
}

fn library_file_name() -> String {
    format!("libonnxruntime.so.{VERSION}")
}

/// The library to load: `$SWITCHYARD_ONNXRUNTIME`, else the installed one, if it exists.
pub fn library_path() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(LIBRARY_ENV) {
        return Some(PathBuf::from(path));
    }
    let installed = install_dir()?.join(library_file_name());
    installed.is_file().then_some(installed)
}

/// The process's ONNX Runtime environment, created on first use from [`library_path`]; the
/// error says why there is none and how to get it. A library that is not there yet is looked
/// for again next time (it may be installed meanwhile); one that failed to load is not.
fn environment() -> Result<&'static ort::environment::Environment, Unavailable> {
    static ENVIRONMENT: OnceLock<Result<ort::environment::Environment, Unavailable>> =
        OnceLock::new();
    static LOADING: Mutex<()> = Mutex::new(());
    let loaded = |result: &'static Result<_, Unavailable>| result.as_ref().map_err(Clone::clone);
    if let Some(result) = ENVIRONMENT.get() {
        return loaded(result);
    }
    let _loading = LOADING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(result) = ENVIRONMENT.get() {
        return loaded(result);
    }
    let path = library_path().ok_or(Unavailable::NotInstalled)?;
    let result = ort::init_from(&path)
        .map_err(|error| Unavailable::Load {
            path: path.clone(),
            error: Arc::new(error),
        })
        .and_then(|builder| {
            builder
                .with_name("switchyard")
                .build()
                .map_err(|error| Unavailable::Start {
                    path: path.clone(),
                    error: Arc::new(error),
                })
        });
    if result.is_ok() {
        tracing::info!("ONNX Runtime loaded from {}", path.display());
    }
    loaded(ENVIRONMENT.get_or_init(|| result))
}

/// Whether ONNX Runtime can be used in this process (loading it on first call).
pub fn available() -> Result<(), Unavailable> {
    environment().map(|_| ())
}

/// Downloads the `onnxruntime` wheel with pip (so pip's index and proxy settings apply),
/// extracts its shared library into [`install_dir`] and returns the library's path.
pub fn install() -> Result<PathBuf, InstallError> {
    let dir = install_dir().ok_or(InstallError::NoCacheDir)?;
    let target = dir.join(library_file_name());
    if target.is_file() {
        return Ok(target);
    }
    let io = |what: String| move |error| InstallError::Io { what, error };
    std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
    let scratch = tempfile::tempdir_in(&dir)
        .map_err(io(format!("a scratch directory in {}", dir.display())))?;
    let wheels = scratch.path().join("wheels");
    run(
        Command::new("python3")
            .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:"])
            .arg(format!("onnxruntime=={VERSION}"))
            .arg("-d")
            .arg(&wheels),
        "downloading the onnxruntime wheel with pip (needs python3 with pip and access to PyPI)",
    )?;
    let wheel = std::fs::read_dir(&wheels)
        .map_err(io(format!("reading {}", wheels.display())))?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| path.extension().is_some_and(|ext| ext == "whl"))
        .ok_or_else(|| InstallError::Step {
            step: "finding the downloaded wheel".into(),
            detail: format!("pip left no .whl in {}", wheels.display()),
        })?;
    let unpacked = scratch.path().join("unpacked");
    // A wheel is a zip file; Python's own zipfile module unpacks it.
    run(
        Command::new("python3")
            .args(["-m", "zipfile", "-e"])
            .arg(&wheel)
            .arg(&unpacked),
        "unpacking the wheel",
    )?;
    let library = unpacked.join("onnxruntime/capi").join(library_file_name());
    if !library.is_file() {
        return Err(InstallError::Step {
            step: "finding the library in the wheel".into(),
            detail: format!(
                "{} has no onnxruntime/capi/{}",
                wheel.display(),
                library_file_name()
            ),
        });
    }
    // Rename within one directory, so a concurrent `library_path` never sees half a file.
    std::fs::rename(&library, &target)
        .map_err(io(format!("moving the library to {}", target.display())))?;
    Ok(target)
}

/// What [`provide`] found or did: ONNX Runtime is ready to load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Provided {
    /// It was there already (installed before, or named by [`LIBRARY_ENV`]).
    Present(PathBuf),
    /// It was missing and has just been installed here.
    Installed(PathBuf),
}

/// Why [`provide`] leaves the host without ONNX Runtime (so `auto` runs tract), each with the
/// way to get it.
#[derive(Debug, thiserror::Error)]
pub enum NotProvided {
    /// Installing was turned off by the caller.
    #[error(
        "ONNX Runtime is not installed and installing it was turned off ({how}); \
         `switchyard install-onnxruntime` installs it"
    )]
    OptedOut {
        /// The flag or variable that turned it off.
        how: String,
    },
    /// No Python with pip to download the wheel with.
    #[error(
        "ONNX Runtime is not installed, and no python3 with pip is on PATH to fetch it \
         ({detail}); install pip (`python3 -m ensurepip --user`, or Debian's python3-pip) and \
         run again, or set {LIBRARY_ENV} to a libonnxruntime.so"
    )]
    NoPip {
        /// What `python3 -m pip --version` said, or why it could not run.
        detail: String,
    },
    /// pip was there but the install failed (no network, no space, an index without it).
    #[error(
        "ONNX Runtime could not be installed ({error}); `switchyard install-onnxruntime` tries \
         again"
    )]
    Install {
        /// What failed (in the message, so not also a `source`).
        error: InstallError,
    },
    /// A library is there but does not load.
    #[error("{0}")]
    Unavailable(Unavailable),
}

/// What [`provide`] does when ONNX Runtime is missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IfMissing {
    /// Install it, when pip is there.
    Install,
    /// Leave it missing: the user turned installing off.
    Leave {
        /// The flag or variable that turned it off, for the message.
        how: String,
    },
}

/// Makes ONNX Runtime ready to load when it can be had: when it is missing, a `python3` with
/// pip is on `PATH` and `if_missing` says install, it installs it ([`install`]) after calling
/// `announce` with the directory it goes into (a wheel of some 28 MB, downloaded once per
/// machine).
/// Why this and not a build-time download: `ort`'s build script cannot reach its binaries here,
/// and a clone must build without it; pip honours the user's index and proxy settings.
pub fn provide(
    if_missing: IfMissing,
    announce: impl FnOnce(&Path),
) -> Result<Provided, NotProvided> {
    if let Some(path) = library_path() {
        available().map_err(NotProvided::Unavailable)?;
        return Ok(Provided::Present(path));
    }
    let dir = install_dir().ok_or(NotProvided::Install {
        error: InstallError::NoCacheDir,
    })?;
    if let IfMissing::Leave { how } = if_missing {
        return Err(NotProvided::OptedOut { how });
    }
    pip_ready().map_err(|detail| NotProvided::NoPip { detail })?;
    announce(&dir);
    let path = install().map_err(|error| NotProvided::Install { error })?;
    available().map_err(NotProvided::Unavailable)?;
    Ok(Provided::Installed(path))
}

/// Whether `python3 -m pip` runs; the error is what it said, or why it could not start.
fn pip_ready() -> Result<(), String> {
    let output = Command::new("python3")
        .args(["-m", "pip", "--version"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run python3: {e}"))?;
    if output.status.success() {
        return Ok(());
    }
    let said = String::from_utf8_lossy(&output.stderr);
    Err(format!(
        "`python3 -m pip --version`: {}",
        said.lines().last().unwrap_or("no output").trim()
    ))
}

fn run(command: &mut Command, step: &str) -> Result<(), InstallError> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| InstallError::Step {
            step: step.to_string(),
            detail: format!("cannot run {:?}: {e}", command.get_program()),
        })?;
    if output.status.success() {
        return Ok(());
    }
    Err(InstallError::Step {
        step: step.to_string(),
        detail: format!(
            "{}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ),
    })
}

fn runtime_error(error: ort::Error) -> NnError {
    NnError::Runtime {
        source: anyhow::Error::new(error),
    }
}

/// A model for ONNX Runtime: its bytes (each execution context opens a session of its own,
/// since a session runs one call at a time) and the names of its inputs and outputs.
pub struct OrtGraph {
    bytes: Arc<[u8]>,
    input_names: Vec<String>,
}

impl OrtGraph {
    /// Checks that ONNX Runtime accepts the model.
    pub fn load(bytes: &[u8]) -> Result<Self, NnError> {
        let session = open(bytes).map_err(|source| NnError::InvalidEncoding {
            encoding: "ONNX",
            source: anyhow::Error::new(source),
        })?;
        let input_names = session
            .inputs()
            .iter()
            .map(|i| i.name().to_string())
            .collect();
        Ok(Self {
            bytes: bytes.into(),
            input_names,
        })
    }
}

/// One session per caller, single-threaded: the host runs one per worker, and workers are
/// already as many as the cores the operator gave them.
fn open(bytes: &[u8]) -> Result<OrtSession, ort::Error> {
    let environment = environment().map_err(|e| ort::Error::new(e.to_string()))?;
    OrtSession::builder(environment)?
        .with_optimization_level(GraphOptimizationLevel::Level3)?
        .with_intra_threads(1)?
        .with_inter_threads(1)?
        .commit_from_memory(bytes)
}

impl Graph for OrtGraph {
    fn session(self: Arc<Self>) -> Result<Box<dyn Session>, NnError> {
        let session = open(&self.bytes).map_err(runtime_error)?;
        Ok(Box::new(OrtContext {
            graph: self,
            session,
        }))
    }
}

struct OrtContext {
    graph: Arc<OrtGraph>,
    session: OrtSession,
}

fn to_value(tensor: &Tensor) -> Result<DynValue, NnError> {
    let shape: Vec<usize> = tensor.dimensions.iter().map(|&d| d as usize).collect();
    fn owned<T: ort::value::PrimitiveTensorElementType + std::fmt::Debug + Clone + 'static>(
        shape: Vec<usize>,
        values: Vec<T>,
    ) -> Result<DynValue, NnError> {
        Ok(OrtTensor::from_array((shape, values))
            .map_err(runtime_error)?
            .into_dyn())
    }
    // Little-endian elements of N bytes; `chunks_exact(N)` only yields whole ones.
    fn decode<T, const N: usize>(data: &[u8], from_le: fn([u8; N]) -> T) -> Vec<T> {
        data.chunks_exact(N)
            .map(|bytes| from_le(bytes.try_into().unwrap_or([0; N])))
            .collect()
    }
    let data = &tensor.data;
    match tensor.ty {
        TensorType::Fp32 => owned(shape, decode(data, f32::from_le_bytes)),
        TensorType::Fp64 => owned(shape, decode(data, f64::from_le_bytes)),
        TensorType::I32 => owned(shape, decode(data, i32::from_le_bytes)),
        TensorType::I64 => owned(shape, decode(data, i64::from_le_bytes)),
        TensorType::U8 => owned(shape, data.clone()),
        TensorType::Fp16 | TensorType::Bf16 => Err(NnError::Unsupported(format!(
            "ONNX Runtime on this host takes FP32, FP64, U8, I32 and I64 tensors, not {:?}",
            tensor.ty
        ))),
    }
}

fn from_value(value: &DynValue) -> Result<Tensor, NnError> {
    let ValueType::Tensor { ty, .. } = value.dtype() else {
        return Err(NnError::Unsupported(format!(
            "the model returns a {:?}, which wasi:nn cannot carry",
            value.dtype()
        )));
    };
    fn bytes<T: ort::value::PrimitiveTensorElementType + std::fmt::Debug, const N: usize>(
        value: &DynValue,
        to_le: impl Fn(&T) -> [u8; N],
    ) -> Result<(Vec<u32>, Vec<u8>), NnError> {
        let (shape, values) = value.try_extract_tensor::<T>().map_err(runtime_error)?;
        Ok((
            shape.iter().map(|&d| d as u32).collect(),
            values.iter().flat_map(to_le).collect(),
        ))
    }
    let (ty, (dimensions, data)) = match ty {
        TensorElementType::Float32 => (
            TensorType::Fp32,
            bytes::<f32, 4>(value, |v| v.to_le_bytes())?,
        ),
        TensorElementType::Float64 => (
            TensorType::Fp64,
            bytes::<f64, 8>(value, |v| v.to_le_bytes())?,
        ),
        TensorElementType::Int32 => (
            TensorType::I32,
            bytes::<i32, 4>(value, |v| v.to_le_bytes())?,
        ),
        TensorElementType::Int64 => (
            TensorType::I64,
            bytes::<i64, 8>(value, |v| v.to_le_bytes())?,
        ),
        TensorElementType::Uint8 => (TensorType::U8, bytes::<u8, 1>(value, |v| [*v])?),
        other => {
            return Err(NnError::Unsupported(format!(
                "the model returns a {other:?} tensor, which wasi:nn cannot carry"
            )));
        }
    };
    Ok(Tensor {
        dimensions,
        ty,
        data,
    })
}

impl Session for OrtContext {
    fn compute(&mut self, inputs: Vec<(String, Tensor)>) -> Result<Vec<(String, Tensor)>, NnError> {
        let mut values: Vec<(Cow<'_, str>, DynValue)> = Vec::with_capacity(inputs.len());
        for (name, tensor) in &inputs {
            tensor.check(name)?;
            if !self.graph.input_names.contains(name) {
                return Err(NnError::InvalidArgument(format!(
                    "the model has no input {name:?}; its inputs are {:?}",
                    self.graph.input_names
                )));
            }
            values.push((Cow::Owned(name.clone()), to_value(tensor)?));
        }
        // ONNX Runtime reports shape mismatches as run failures; they are the caller's.
        let outputs = self.session.run(values).map_err(|e| match e.code() {
            ort::error::ErrorCode::InvalidArgument => {
                NnError::InvalidArgument(format!("ONNX Runtime refused the inputs: {e}"))
            }
            _ => runtime_error(e),
        })?;
        outputs
            .iter()
            .map(|(name, value)| Ok((name.to_string(), from_value(&value)?)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::{Encoding, NnEngine, NnHost, test_lenet};

    fn images(count: u32) -> Tensor {
        // A gradient rather than a constant, so the logits depend on every pixel.
        let pixels = (0..count as usize * 784).map(|i| ((i * 37) % 256) as f32 / 255.0);
        Tensor {
            dimensions: vec![count, 1, 28, 28],
            ty: TensorType::Fp32,
            data: pixels.flat_map(f32::to_le_bytes).collect(),
        }
    }

    fn floats(tensor: &Tensor) -> Vec<f32> {
        tensor
            .data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }

    /// Installs ONNX Runtime the way users do (pip, PyPI) and computes what tract computes.
    #[test]
    fn installed_onnxruntime_computes_tracts_logits() {
        let path = install().expect("installing ONNX Runtime with pip");
        assert!(path.is_file());
        available().unwrap();
        assert_eq!(NnEngine::Auto.resolve(), NnEngine::Onnxruntime);

        let host = NnHost::new();
        let ort = host
            .load(&[test_lenet()], Encoding::Onnx, NnEngine::Onnxruntime)
            .unwrap();
        let tract = host
            .load(&[test_lenet()], Encoding::Onnx, NnEngine::Tract)
            .unwrap();
        let (mut ort, mut tract) = (ort.session().unwrap(), tract.session().unwrap());
        for batch in [1, 5] {
            let want = tract
                .compute(vec![("image".into(), images(batch))])
                .unwrap();
            let got = ort.compute(vec![("image".into(), images(batch))]).unwrap();
            assert_eq!(got[0].0, "logits");
            assert_eq!(got[0].1.dimensions, [batch, 10]);
            for (g, w) in floats(&got[0].1).iter().zip(floats(&want[0].1)) {
                assert!((g - w).abs() < 1e-4, "onnxruntime {g}, tract {w}");
            }
        }

        let error = ort
            .compute(vec![(
                "image".into(),
                Tensor {
                    dimensions: vec![1, 1, 27, 28],
                    data: vec![0; 27 * 28 * 4],
                    ..images(1)
                },
            )])
            .unwrap_err();
        assert!(matches!(error, NnError::InvalidArgument(_)), "{error:?}");
        let error = host
            .load(
                &[b"not a model".to_vec()],
                Encoding::Onnx,
                NnEngine::Onnxruntime,
            )
            .err()
            .unwrap();
        assert!(
            matches!(error, NnError::InvalidEncoding { .. }),
            "{error:?}"
        );
    }
}
