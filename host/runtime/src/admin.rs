//! The admin socket: how `switchyard deploy` reaches a running `switchyard run`.
//!
//! A Unix socket, because deploying means choosing the code a host runs: only the user who runs
//! the host may do it, and the file system already says who that is (the socket is `0600` in
//! a directory nobody else may write), with no port to pick, no address to guard and no token
//! to hand out. It is found by the manifest's path: by default it lives in
//! `$XDG_RUNTIME_DIR/switchyard/` (or `/tmp/switchyard-UID/`) under a name made of the
//! manifest's file name and a hash of its absolute path, so `switchyard deploy MANIFEST`
//! finds the host that `switchyard run MANIFEST` started, and two hosts of two manifests
//! never meet. `--admin-socket` names another place.
//!
//! The protocol is one JSON line each way per connection: a [`Request`], then a [`Response`]
//! once the work is done (a deploy that compiles a large component takes seconds).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use crate::app::DeployReport;

/// What a client asks of a running host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Read the manifest again and deploy what changed in it and in its `.wasm` files.
    Deploy {
        /// The manifest the client means (absolute): a host running another refuses, so a
        /// misdirected `--admin-socket` deploys nothing.
        manifest: PathBuf,
    },
}

/// A host's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum Response {
    /// The deploy was applied.
    Deployed(DeployReport),
    /// Refused or failed, with what and the fix.
    Failed {
        /// The error.
        error: String,
    },
}

/// Why the admin socket could not be served or reached.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Nothing listens there.
    #[error(
        "no `switchyard run` is listening at {path}: start `switchyard run MANIFEST` with the \
         same manifest (deploy finds it by the manifest's path), or pass the \
         --admin-socket it was started with"
    )]
    NotListening {
        /// The socket's path.
        path: PathBuf,
        /// What connecting said.
        source: std::io::Error,
    },
    /// Another host serves this socket.
    #[error(
        "another `switchyard run` is listening at {path}: stop it, or give this one its own \
         --admin-socket"
    )]
    InUse {
        /// The socket's path.
        path: PathBuf,
    },
    /// Something other than a socket is in the way.
    #[error("{path} exists and is not a socket: remove it, or pass another --admin-socket")]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// The directory for sockets may be changed by someone else.
    #[error(
        "{path} is not safe for the admin socket: {reason} (remove it, or pass an \
         --admin-socket in a directory only you can write)"
    )]
    Unsafe {
        /// The directory.
        path: PathBuf,
        /// What is wrong with it (its text is part of this error's).
        reason: crate::private_dir::NotPrivate,
    },
    /// Reading or writing failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// The other side did not speak the protocol.
    #[error("{what}")]
    Protocol {
        /// What was being read.
        what: String,
        /// The error.
        source: serde_json::Error,
    },
    /// The host closed the connection without answering (it stopped meanwhile).
    #[error("the host at {path} closed the connection without answering (did it stop?)")]
    NoAnswer {
        /// The socket's path.
        path: PathBuf,
    },
}

/// switchyard's per-user directory for what lives as long as a process (sockets, locks):
/// `$XDG_RUNTIME_DIR/switchyard`, else `/tmp/switchyard-UID`.
pub(crate) fn user_runtime_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) => PathBuf::from(dir).join("switchyard"),
        None => {
            // SAFETY: geteuid has no preconditions and cannot fail.
            let user = unsafe { libc::geteuid() };
            std::env::temp_dir().join(format!("switchyard-{user}"))
        }
    }
}

/// Where `switchyard run MANIFEST` listens unless told otherwise (see the module docs).
pub fn default_socket(manifest: &Path) -> Result<PathBuf, AdminError> {
    let manifest = absolute_manifest(manifest)?;
    let dir = user_runtime_dir();
    // Unix socket paths are short (108 bytes on Linux): the name keeps 32 characters of the
    // manifest's file name, for people listing the directory, and the hash tells them apart.
    let stem: String = manifest
        .file_stem()
        .map(|stem| stem.to_string_lossy())
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .take(32)
        .collect();
    let digest = Sha256::digest(manifest.as_os_str().as_encoded_bytes());
    Ok(dir.join(format!("{stem}-{}.sock", &hex::encode(digest)[..12])))
}

/// The manifest's absolute path, with symbolic links resolved: what names it to both sides.
pub fn absolute_manifest(manifest: &Path) -> Result<PathBuf, AdminError> {
    manifest.canonicalize().map_err(|source| AdminError::Io {
        what: format!("finding the manifest {}", manifest.display()),
        source,
    })
}

/// Requests arriving on a bound admin socket, each with where its answer goes. The socket
/// file is removed when this is dropped.
pub struct AdminSocket {
    path: PathBuf,
    requests: mpsc::Receiver<(Request, oneshot::Sender<Response>)>,
    server: tokio::task::JoinHandle<()>,
}

/// The longest a client may take to send its request.
const REQUEST_WAIT: Duration = Duration::from_secs(10);

/// The longest request line taken.
const MAX_REQUEST_BYTES: u64 = 64 * 1024;

impl AdminSocket {
    /// Listens at `path`: creates its directory private to the user when `private_dir`
    /// (the default location), replaces a stale socket a host that died left behind, and
    /// refuses a socket another host still serves.
    pub fn bind(path: &Path, private_dir: bool) -> Result<Self, AdminError> {
        let dir = path.parent().unwrap_or(Path::new("."));
        if private_dir {
            prepare_private_dir(dir)?;
        }
        match std::fs::symlink_metadata(path) {
            Ok(metadata) => {
                use std::os::unix::fs::FileTypeExt;
                if !metadata.file_type().is_socket() {
                    return Err(AdminError::NotASocket { path: path.into() });
                }
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(AdminError::InUse { path: path.into() });
                }
                std::fs::remove_file(path).map_err(|source| AdminError::Io {
                    what: format!("removing the stale socket {}", path.display()),
                    source,
                })?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(AdminError::Io {
                    what: format!("looking at {}", path.display()),
                    source,
                });
            }
        }
        let listener = UnixListener::bind(path).map_err(|source| AdminError::Io {
            what: format!("listening at {}", path.display()),
            source,
        })?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(
                |source| AdminError::Io {
                    what: format!("making {} private", path.display()),
                    source,
                },
            )?;
        }
        let (sender, requests) = mpsc::channel(4);
        let server = tokio::spawn(serve(listener, sender));
        Ok(Self {
            path: path.to_path_buf(),
            requests,
            server,
        })
    }

    /// Where it listens.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The next request, and where its answer goes.
    pub async fn next(&mut self) -> Option<(Request, oneshot::Sender<Response>)> {
        self.requests.recv().await
    }
}

impl Drop for AdminSocket {
    fn drop(&mut self) {
        self.server.abort();
        // Leaving it would only make the next host check that nobody listens.
        let _ = std::fs::remove_file(&self.path);
    }
}

fn prepare_private_dir(dir: &Path) -> Result<(), AdminError> {
    crate::private_dir::create(dir).map_err(|source| AdminError::Io {
        what: format!("creating {}", dir.display()),
        source,
    })?;
    crate::private_dir::check(dir).map_err(|reason| AdminError::Unsafe {
        path: dir.to_path_buf(),
        reason,
    })
}

async fn serve(
    listener: UnixListener,
    requests: mpsc::Sender<(Request, oneshot::Sender<Response>)>,
) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, say: the host goes on, deploys wait.
                tracing::warn!("admin socket: cannot accept a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let requests = requests.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, requests).await {
                tracing::warn!("admin socket: {:#}", anyhow::Error::new(e));
            }
        });
    }
}

/// Reads one request, hands it to the host, and writes the answer.
async fn answer(
    stream: UnixStream,
    requests: mpsc::Sender<(Request, oneshot::Sender<Response>)>,
) -> Result<(), AdminError> {
    let (reader, mut writer) = stream.into_split();
    let mut line = String::new();
    let read = tokio::time::timeout(
        REQUEST_WAIT,
        BufReader::new(reader)
            .take(MAX_REQUEST_BYTES)
            .read_line(&mut line),
    )
    .await;
    let response = match read {
        Err(_) => return Ok(()),
        Ok(Err(source)) => {
            return Err(AdminError::Io {
                what: "reading a request".into(),
                source,
            });
        }
        Ok(Ok(_)) => match serde_json::from_str::<Request>(&line) {
            Err(e) => Response::Failed {
                error: format!(
                    "not a request this host understands ({e}): use the `switchyard` that runs \
                     it"
                ),
            },
            Ok(request) => {
                let (reply, answer) = oneshot::channel();
                if requests.send((request, reply)).await.is_err() {
                    return Ok(());
                }
                match answer.await {
                    Ok(response) => response,
                    // The host is stopping: the client says it got no answer.
                    Err(_) => return Ok(()),
                }
            }
        },
    };
    write_line(&mut writer, &response).await
}

async fn write_line(
    writer: &mut (impl AsyncWriteExt + Unpin),
    value: &impl Serialize,
) -> Result<(), AdminError> {
    let mut bytes = serde_json::to_vec(value).map_err(|source| AdminError::Protocol {
        what: "encoding a message".into(),
        source,
    })?;
    bytes.push(b'\n');
    writer
        .write_all(&bytes)
        .await
        .map_err(|source| AdminError::Io {
            what: "writing to the admin socket".into(),
            source,
        })
}

/// Sends `request` to the host listening at `socket` and waits for its answer, however long
/// the work takes.
pub async fn request(socket: &Path, request: &Request) -> Result<Response, AdminError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                AdminError::NotListening {
                    path: socket.into(),
                    source,
                }
            }
            _ => AdminError::Io {
                what: format!("connecting to {}", socket.display()),
                source,
            },
        })?;
    let (reader, mut writer) = stream.into_split();
    write_line(&mut writer, request).await?;
    let mut line = String::new();
    BufReader::new(reader)
        .read_line(&mut line)
        .await
        .map_err(|source| AdminError::Io {
            what: format!("reading the answer from {}", socket.display()),
            source,
        })?;
    if line.is_empty() {
        return Err(AdminError::NoAnswer {
            path: socket.into(),
        });
    }
    serde_json::from_str(&line).map_err(|source| AdminError::Protocol {
        what: format!("the answer from {}", socket.display()),
        source,
    })
}

/// Checks that the default socket's directory is private before a client trusts what
/// answers there.
pub fn check_default_dir(socket: &Path) -> Result<(), AdminError> {
    let dir = socket.parent().unwrap_or(Path::new("."));
    crate::private_dir::check(dir).map_err(|reason| match reason {
        crate::private_dir::NotPrivate::Io(source)
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            AdminError::NotListening {
                path: socket.into(),
                source,
            }
        }
        reason => AdminError::Unsafe {
            path: dir.to_path_buf(),
            reason,
        },
    })
}
