//! Checks a component against the world its role needs, from its bytes alone.
//!
//! Why before compiling: compiling a large component takes seconds (the classifier, 9.4 s), and
//! a component built against the wrong world (a handler started as a command, an interface
//! switchyard does not provide) should be refused at once, with its name and the fix, by
//! `switchyard validate` and by `run` alike. The check reads the component's top-level import
//! and export names; it does not compare their types, which the link after compiling does
//! (with wasmtime's own message).

use std::path::{Path, PathBuf};

use wasmparser::{Parser, Payload};

/// What a component is run as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Called once per message: it has `subscribe` topics.
    Handler,
    /// Run once through `wasi:cli/run`: it has none.
    Command,
    /// A unit-test binary run by `switchyard test`: a command that may also import
    /// `switchyard:host/test-support`.
    UnitTests,
}

impl Role {
    /// The role a manifest entry gives its component.
    pub fn of(config: &crate::manifest::ComponentConfig) -> Self {
        if config.is_handler() {
            Role::Handler
        } else {
            Role::Command
        }
    }

    /// The export the host calls, and the world in `wit/` that has it.
    fn needs(self) -> (&'static str, &'static str) {
        match self {
            Role::Handler => (HANDLER_EXPORT, "switchyard:host/handler"),
            Role::Command => ("wasi:cli/run@0.2", "switchyard:host/producer"),
            Role::UnitTests => ("wasi:cli/run@0.2", "switchyard:host/unit-tests"),
        }
    }
}

/// The export a handler must have.
const HANDLER_EXPORT: &str = "wasi:messaging/incoming-handler@0.2.0-draft";

/// The interface only test mode provides.
const TEST_SUPPORT: &str = "switchyard:host/test-support@0.1.0";

/// The interfaces switchyard provides, by name without version, with the versions it takes
/// (a prefix of the version: WASI 0.2 is any 0.2.x).
const PROVIDED: &[(&str, &str)] = &[
    ("wasi:messaging/types", "0.2.0-draft"),
    ("wasi:messaging/producer", "0.2.0-draft"),
    ("switchyard:host/results", "0.1.0"),
    ("switchyard:host/progress", "0.1.0"),
    ("wasi:nn/tensor", "0.2.0-rc-2024-10-28"),
    ("wasi:nn/graph", "0.2.0-rc-2024-10-28"),
    ("wasi:nn/inference", "0.2.0-rc-2024-10-28"),
    ("wasi:nn/errors", "0.2.0-rc-2024-10-28"),
];

/// The WASI 0.2 packages switchyard provides (every interface of each).
const WASI_PACKAGES: &[&str] = &[
    "wasi:cli/",
    "wasi:io/",
    "wasi:clocks/",
    "wasi:filesystem/",
    "wasi:random/",
    "wasi:sockets/",
];

/// What a component's top level imports and exports, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Shape {
    /// Import names, such as `wasi:messaging/producer@0.2.0-draft`.
    pub imports: Vec<String>,
    /// Export names, such as `wasi:messaging/incoming-handler@0.2.0-draft`.
    pub exports: Vec<String>,
}

/// Why a component does not fit its role.
#[derive(Debug, thiserror::Error)]
pub enum WorldError {
    /// The file cannot be read.
    #[error("component {path}: cannot read it: {error}")]
    Read {
        /// The `.wasm` path.
        path: PathBuf,
        /// The I/O error (in the message, so not also a `source`).
        error: std::io::Error,
    },
    /// The file is not a WebAssembly component at all.
    #[error("component {path}: {reason}")]
    NotAComponent {
        /// The `.wasm` path.
        path: PathBuf,
        /// What it is instead, and the fix.
        reason: String,
    },
    /// A component header followed by bytes that do not parse.
    #[error(
        "component {path}: damaged or not a component ({error}); rebuild it for the \
         wasm32-wasip2 target"
    )]
    Malformed {
        /// The `.wasm` path.
        path: PathBuf,
        /// Where the bytes stop making sense (in the message, so not also a `source`).
        error: wasmparser::BinaryReaderError,
    },
    /// The export the role needs is missing.
    #[error(
        "component {path}: {role} must export {export}, and this one exports {found}: build it \
         against the {world} world in wit/{hint}"
    )]
    MissingExport {
        /// The `.wasm` path.
        path: PathBuf,
        /// The role, as the manifest gives it.
        role: &'static str,
        /// The missing export.
        export: &'static str,
        /// What it exports instead.
        found: String,
        /// The world that has the export.
        world: &'static str,
        /// How the manifest could mean something else.
        hint: &'static str,
    },
    /// It imports something switchyard does not provide.
    #[error(
        "component {path} imports {import}, which switchyard does not provide{why}; switchyard \
         provides WASI 0.2 (cli, io, clocks, filesystem, random, sockets), \
         wasi:messaging/types and producer @0.2.0-draft, switchyard:host/results and \
         progress @0.1.0, and wasi:nn @0.2.0-rc-2024-10-28"
    )]
    UnknownImport {
        /// The `.wasm` path.
        path: PathBuf,
        /// The import's name.
        import: String,
        /// More about this import, if known.
        why: &'static str,
    },
}

/// Reads the top-level import and export names of the component at `path`.
pub fn shape_of_file(path: &Path) -> Result<Shape, WorldError> {
    let bytes = std::fs::read(path).map_err(|error| WorldError::Read {
        path: path.to_path_buf(),
        error,
    })?;
    shape(path, &bytes)
}

/// Reads the top-level import and export names of a component (`path` names it in errors).
pub fn shape(path: &Path, bytes: &[u8]) -> Result<Shape, WorldError> {
    let malformed = |error| WorldError::Malformed {
        path: path.to_path_buf(),
        error,
    };
    super::engine::check_is_component(bytes).map_err(|reason| WorldError::NotAComponent {
        path: path.to_path_buf(),
        reason,
    })?;
    let mut shape = Shape::default();
    // Nested modules and components are parsed inline; only the outermost level's imports
    // and exports are the component's.
    let mut depth = 0usize;
    for payload in Parser::new(0).parse_all(bytes) {
        match payload.map_err(malformed)? {
            Payload::ModuleSection { .. } | Payload::ComponentSection { .. } => depth += 1,
            Payload::End(_) => depth = depth.saturating_sub(1),
            Payload::ComponentImportSection(reader) if depth == 0 => {
                for import in reader {
                    shape
                        .imports
                        .push(import.map_err(malformed)?.name.name.to_string());
                }
            }
            Payload::ComponentExportSection(reader) if depth == 0 => {
                for export in reader {
                    shape
                        .exports
                        .push(export.map_err(malformed)?.name.name.to_string());
                }
            }
            _ => {}
        }
    }
    Ok(shape)
}

/// Checks that a component of this shape can run as `role` here: it exports what the host
/// calls and imports only what the host provides.
pub fn check(path: &Path, shape: &Shape, role: Role) -> Result<(), WorldError> {
    for import in &shape.imports {
        if import == TEST_SUPPORT && role == Role::UnitTests {
            continue;
        }
        if !provided(import) {
            let why = if import == TEST_SUPPORT {
                " outside `switchyard test`, which runs unit tests (it is for test code only: \
                 keep switchyard-test a dev-dependency)"
            } else if import.starts_with("wasi:messaging/request-reply@") {
                " yet (the proposal makes request-reply optional)"
            } else if import.starts_with("wasi:http/") {
                " (components reach the outside only through messaging)"
            } else {
                ""
            };
            return Err(WorldError::UnknownImport {
                path: path.to_path_buf(),
                import: import.clone(),
                why,
            });
        }
    }
    let (export, world) = role.needs();
    if !shape.exports.iter().any(|name| name.starts_with(export)) {
        let found = if shape.exports.is_empty() {
            "nothing".to_string()
        } else {
            shape.exports.join(", ")
        };
        let (role, hint) = match role {
            Role::Handler => (
                "a component with `subscribe` topics (a handler)",
                if shape
                    .exports
                    .iter()
                    .any(|name| name.starts_with("wasi:cli/run@"))
                {
                    ", or remove `subscribe` from its manifest entry to run it as a command"
                } else {
                    ""
                },
            ),
            Role::UnitTests => (
                "a test binary (what `cargo test --target wasm32-wasip2` builds)",
                ", or run the component itself with `switchyard run` or `exec`",
            ),
            Role::Command => (
                "a component without `subscribe` topics (a command)",
                if shape
                    .exports
                    .iter()
                    .any(|name| name.starts_with(HANDLER_EXPORT))
                {
                    ", or give its manifest entry the topics to `subscribe` to"
                } else {
                    ""
                },
            ),
        };
        return Err(WorldError::MissingExport {
            path: path.to_path_buf(),
            role,
            export,
            found,
            world,
            hint,
        });
    }
    Ok(())
}

/// Whether switchyard provides the interface `import` names.
fn provided(import: &str) -> bool {
    let (name, version) = import.split_once('@').unwrap_or((import, ""));
    if WASI_PACKAGES
        .iter()
        .any(|package| name.starts_with(package))
    {
        return version.starts_with("0.2.");
    }
    PROVIDED
        .iter()
        .any(|(provided, versions)| name == *provided && version == *versions)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape_with(imports: &[&str], exports: &[&str]) -> Shape {
        Shape {
            imports: imports.iter().map(|s| s.to_string()).collect(),
            exports: exports.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn a_handler_needs_the_incoming_handler_export() {
        let path = Path::new("h.wasm");
        let handler = shape_with(
            &[
                "wasi:messaging/types@0.2.0-draft",
                "wasi:messaging/producer@0.2.0-draft",
                "wasi:io/streams@0.2.6",
            ],
            &[HANDLER_EXPORT],
        );
        check(path, &handler, Role::Handler).unwrap();
        let error = check(path, &handler, Role::Command)
            .unwrap_err()
            .to_string();
        assert!(error.contains("must export wasi:cli/run@0.2"), "{error}");
        assert!(
            error.contains("give its manifest entry the topics"),
            "{error}"
        );

        let command = shape_with(&["wasi:cli/environment@0.2.3"], &["wasi:cli/run@0.2.3"]);
        check(path, &command, Role::Command).unwrap();
        let error = check(path, &command, Role::Handler)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("must export wasi:messaging/incoming-handler"),
            "{error}"
        );
        assert!(error.contains("remove `subscribe`"), "{error}");
    }

    #[test]
    fn only_test_mode_provides_test_support() {
        let path = Path::new("tests.wasm");
        let tests = shape_with(
            &["wasi:messaging/types@0.2.0-draft", TEST_SUPPORT],
            &["wasi:cli/run@0.2.6", HANDLER_EXPORT],
        );
        check(path, &tests, Role::UnitTests).unwrap();
        let refused = check(path, &tests, Role::Command).unwrap_err().to_string();
        assert!(refused.contains(TEST_SUPPORT), "{refused}");
        assert!(refused.contains("outside `switchyard test`"), "{refused}");
        let refused = check(path, &tests, Role::Handler).unwrap_err().to_string();
        assert!(refused.contains("outside `switchyard test`"), "{refused}");
        let library = shape_with(&[], &[HANDLER_EXPORT]);
        let refused = check(path, &library, Role::UnitTests)
            .unwrap_err()
            .to_string();
        assert!(refused.contains("a test binary"), "{refused}");
    }

    #[test]
    fn imports_the_host_lacks_are_named() {
        let path = Path::new("h.wasm");
        for (import, says) in [
            (
                "wasi:messaging/request-reply@0.2.0-draft",
                "request-reply optional",
            ),
            ("wasi:http/outgoing-handler@0.2.0", "only through messaging"),
            ("wasi:messaging/types@0.1.0", "does not provide"),
            ("wasi:io/streams@0.3.0", "does not provide"),
            ("acme:cache/store", "does not provide"),
        ] {
            let shape = shape_with(&[import], &[HANDLER_EXPORT]);
            let error = check(path, &shape, Role::Handler).unwrap_err().to_string();
            assert!(error.contains(import) && error.contains(says), "{error}");
        }
    }

    #[test]
    fn bytes_that_are_not_a_component_are_refused() {
        let path = Path::new("x.wasm");
        for (bytes, says) in [
            (&b"\0asm\x01\0\0\0"[..], "core WebAssembly module"),
            (b"not wasm at all", "not a WebAssembly file"),
            (b"\0asm\x0d\0\x01\0garbage", "damaged or not a component"),
        ] {
            let error = shape(path, bytes).unwrap_err().to_string();
            assert!(error.contains(says), "{error}");
        }
        assert_eq!(shape(path, b"\0asm\x0d\0\x01\0").unwrap(), Shape::default());
    }
}
