//! `switchyard new`: a component crate that builds, tests and runs as generated.
//!
//! Why it writes everything into the crate (the published WIT, the switchyard WIT the test
//! helper needs, the helper itself): the crate must build with plain cargo wherever it is
//! created, with nothing but `switchyard` on the PATH and crates.io, and it must stay that way
//! when committed and cloned elsewhere. The component itself is built from the published
//! `wasi:messaging` worlds alone (`messaging-core` for a handler, `imports` for a command), so
//! it runs on any host of the proposal; only its tests use `switchyard:host/test-support`.

use std::path::{Path, PathBuf};

/// What kind of component to create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Called once per message (`wasi:messaging/incoming-handler`).
    Handler,
    /// Run once (`wasi:cli/run`), sending messages.
    Command,
}

/// Why a component crate could not be created.
#[derive(Debug, thiserror::Error)]
pub enum ScaffoldError {
    /// The name cannot be a crate, a WIT world and a topic prefix at once.
    #[error(
        "{name:?} cannot name a component: use lowercase letters, digits and single hyphens, \
         each word starting with a letter (such as `order-router`)"
    )]
    BadName {
        /// The name given.
        name: String,
    },
    /// Something is already there.
    #[error("{} already exists: choose another name or remove it", path.display())]
    Exists {
        /// The directory.
        path: PathBuf,
    },
    /// A file could not be written.
    #[error("cannot write {}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// The published `wasi:messaging@0.2.0-draft` files, as `wit/deps/messaging` declares them.
const MESSAGING_WIT: [(&str, &str); 5] = [
    (
        "types.wit",
        include_str!("../../wit/deps/messaging/types.wit"),
    ),
    (
        "producer.wit",
        include_str!("../../wit/deps/messaging/producer.wit"),
    ),
    (
        "guest.wit",
        include_str!("../../wit/deps/messaging/guest.wit"),
    ),
    (
        "request-reply.wit",
        include_str!("../../wit/deps/messaging/request-reply.wit"),
    ),
    (
        "messaging.wit",
        include_str!("../../wit/deps/messaging/messaging.wit"),
    ),
];
const SWITCHYARD_WIT: &str = include_str!("../../wit/switchyard.wit");
const NN_WIT: &str = include_str!("../../wit/deps/nn/nn.wit");
const HELPER_LIB: &str = include_str!("../../components/libs/switchyard-test/src/lib.rs");
/// The helper's WIT path in this repository, and in a created crate.
const HELPER_WIT_PATH: (&str, &str) = ("path: \"../../../wit\"", "path: \"wit\"");
/// The wit-bindgen this repository's components build with.
const WIT_BINDGEN: &str = "0.63.0";

/// Whether `name` can be a crate, a WIT world and a topic prefix.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.split('-').all(|word| {
            word.starts_with(|c: char| c.is_ascii_lowercase())
                && word
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        })
}

/// Creates the crate `name` of `kind` in `parent`/`name` and returns its directory.
pub fn create(parent: &Path, name: &str, kind: Kind) -> Result<PathBuf, ScaffoldError> {
    if !valid_name(name) {
        return Err(ScaffoldError::BadName { name: name.into() });
    }
    let root = parent.join(name);
    if root.exists() {
        return Err(ScaffoldError::Exists { path: root });
    }
    for (path, text) in files(name, kind) {
        let path = root.join(path);
        let write = |path: &Path| {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::write(path, &text)
        };
        write(&path).map_err(|source| ScaffoldError::Write { path, source })?;
    }
    Ok(root)
}

/// Every file of the crate, by path relative to its root.
fn files(name: &str, kind: Kind) -> Vec<(PathBuf, String)> {
    let crate_ident = name.replace('-', "_");
    let fill = |template: &str| {
        template
            .replace("{{name}}", name)
            .replace("{{crate}}", &crate_ident)
            .replace("{{wit_bindgen}}", WIT_BINDGEN)
    };
    let mut files = vec![
        (
            PathBuf::from("Cargo.toml"),
            fill(CARGO).replace(
                "{{lib}}",
                match kind {
                    Kind::Handler => "\n[lib]\ncrate-type = [\"cdylib\"]\n",
                    Kind::Command => "",
                },
            ),
        ),
        (PathBuf::from(".cargo/config.toml"), CARGO_CONFIG.into()),
        (
            PathBuf::from(".gitignore"),
            "/target\n# written by `cargo component`, unused (see Cargo.toml)\n/src/bindings.rs\n"
                .into(),
        ),
        (
            PathBuf::from("wit/world.wit"),
            fill(match kind {
                Kind::Handler => HANDLER_WORLD,
                Kind::Command => COMMAND_WORLD,
            }),
        ),
        (
            PathBuf::from(format!("{name}.toml")),
            fill(match kind {
                Kind::Handler => HANDLER_MANIFEST,
                Kind::Command => COMMAND_MANIFEST,
            }),
        ),
        (
            match kind {
                Kind::Handler => PathBuf::from("src/lib.rs"),
                Kind::Command => PathBuf::from("src/main.rs"),
            },
            fill(match kind {
                Kind::Handler => HANDLER_SOURCE,
                Kind::Command => COMMAND_SOURCE,
            }),
        ),
        (
            PathBuf::from("switchyard-test/Cargo.toml"),
            fill(HELPER_CARGO),
        ),
        (
            PathBuf::from("switchyard-test/src/lib.rs"),
            HELPER_LIB.replace(HELPER_WIT_PATH.0, HELPER_WIT_PATH.1),
        ),
        (
            PathBuf::from("switchyard-test/wit/switchyard.wit"),
            SWITCHYARD_WIT.into(),
        ),
        (
            PathBuf::from("switchyard-test/wit/deps/nn/nn.wit"),
            NN_WIT.into(),
        ),
    ];
    for (file, text) in MESSAGING_WIT {
        for dir in ["wit/deps/messaging", "switchyard-test/wit/deps/messaging"] {
            files.push((Path::new(dir).join(file), text.into()));
        }
    }
    files
}

const CARGO_CONFIG: &str = r#"# Build for wasm32-wasip2, and run tests inside Wasm in the switchyard host (`switchyard test`:
# sends are recorded, no broker), so `cargo test` and `cargo build` need no flags.
[build]
target = "wasm32-wasip2"

[target.wasm32-wasip2]
runner = "switchyard test"

# `cargo component test` (cargo-component builds for wasm32-wasip1 and makes components of
# the test binaries) runs them the same way.
[target.wasm32-wasip1]
runner = "switchyard test"
"#;

/// The crate's manifest; `{{lib}}` makes a handler a library (a command is a binary).
const CARGO: &str = r#"[package]
name = "{{name}}"
version = "0.1.0"
edition = "2024"
publish = false
{{lib}}
[dependencies]
wit-bindgen = { version = "{{wit_bindgen}}", default-features = false, features = ["macros", "realloc"] }

[dev-dependencies]
switchyard-test = { path = "switchyard-test" }

# A crate of its own, wherever it is created.
[workspace]

# For `cargo component test`: where cargo-component finds the world (it also writes
# src/bindings.rs from it, which this crate does not use: wit_bindgen::generate! in
# src/lib.rs makes the bindings, so plain cargo needs no cargo-component).
[package.metadata.component.target]
path = "wit"
world = "{{name}}"

[package.metadata.component.target.dependencies]
"wasi:messaging" = { path = "wit/deps/messaging" }
"#;

const HELPER_CARGO: &str = r#"# switchyard's test helper, as `switchyard new` wrote it (from the switchyard that created
# this crate): see src/lib.rs.
[package]
name = "switchyard-test"
version = "0.1.0"
edition = "2024"
publish = false

[target.'cfg(target_arch = "wasm32")'.dependencies]
wit-bindgen = { version = "{{wit_bindgen}}", default-features = false, features = ["macros", "realloc"] }
"#;

const HANDLER_WORLD: &str = r#"package {{name}}:component;

/// A handler built from the published `wasi:messaging` alone (wit/deps/messaging), so it runs
/// on any host of the proposal.
world {{name}} {
    include wasi:messaging/messaging-core@0.2.0-draft;
}
"#;

const COMMAND_WORLD: &str = r#"package {{name}}:component;

/// A command that sends messages, built from the published `wasi:messaging` alone
/// (wit/deps/messaging).
world {{name}} {
    include wasi:messaging/imports@0.2.0-draft;
}
"#;

const HANDLER_MANIFEST: &str = r#"# {{name}} under switchyard: `cargo build --release`, then `switchyard run {{name}}.toml`.
# The embedded broker also listens on 127.0.0.1:9092, where `switchyard publish` and
# `switchyard consume` find it by default.

[broker.embedded]
listen = "127.0.0.1:9092"

[components.{{name}}]
wasm = "${CARGO_TARGET_DIR:-target}/wasm32-wasip2/release/{{crate}}.wasm"
subscribe = ["{{name}}-in"]
publish = ["{{name}}-out"]
"#;

const COMMAND_MANIFEST: &str = r#"# {{name}} under switchyard: `cargo build --release`, then `switchyard run {{name}}.toml`.
# The embedded broker also listens on 127.0.0.1:9092, where `switchyard consume` finds it by
# default.

[broker.embedded]
listen = "127.0.0.1:9092"

[components.{{name}}]
wasm = "${CARGO_TARGET_DIR:-target}/wasm32-wasip2/release/{{name}}.wasm"
publish = ["{{name}}-out"]
args = ["hello", "world"]
"#;

const HANDLER_SOURCE: &str = r#"//! {{name}}: a switchyard handler. For each message on the topics its manifest subscribes to,
//! it sends the text upper-cased to `{{name}}-out`, with the message's `request-id` metadata
//! copied; a payload that is not UTF-8 is answered with an error, which the host retries and
//! then dead-letters.

wit_bindgen::generate!({
    world: "{{name}}",
    path: "wit",
    generate_all,
});

use exports::wasi::messaging::incoming_handler::Guest;
use wasi::messaging::producer;
use wasi::messaging::types::{Client, Error, Message};

/// Where the answers go (granted by `publish` in {{name}}.toml).
const OUTPUT_TOPIC: &str = "{{name}}-out";

struct Component;

impl Guest for Component {
    fn handle(message: Message) -> Result<(), Error> {
        let text = String::from_utf8(message.data())
            .map_err(|_| Error::Other("the payload is not UTF-8 text".into()))?;
        let answer = Message::new(text.to_uppercase().as_bytes());
        answer.set_content_type("text/plain");
        let request_id = message
            .metadata()
            .unwrap_or_default()
            .into_iter()
            .find(|(key, _)| key == "request-id");
        if let Some((key, value)) = request_id {
            answer.add_metadata(&key, &value);
        }
        let client = Client::connect("default")?;
        producer::send(&client, OUTPUT_TOPIC, answer)
    }
}

export!(Component);

/// Run inside Wasm by `cargo test` (the runner is `switchyard test`): each test hands a
/// message to the handler and checks what it sent.
#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_test::{Received, deliver};

    switchyard_test::message_type!(Message);

    #[test]
    fn answers_text_upper_cased_with_its_request_id() {
        let request = Received::on("{{name}}-in", "hello").header("request-id", "r-1");
        let delivery = deliver(Component::handle, request);
        assert!(delivery.outcome.is_ok(), "{:?}", delivery.outcome);
        assert_eq!(delivery.sent.len(), 1);
        let answer = &delivery.sent[0];
        assert_eq!(answer.topic, OUTPUT_TOPIC);
        assert_eq!(answer.text(), "HELLO");
        assert_eq!(answer.content_type.as_deref(), Some("text/plain"));
        assert_eq!(answer.header("request-id"), Some("r-1"));
    }

    #[test]
    fn refuses_what_is_not_text_and_sends_nothing() {
        let delivery = deliver(Component::handle, Received::on("{{name}}-in", [0xff, 0xfe]));
        assert!(matches!(delivery.outcome, Err(Error::Other(_))), "{:?}", delivery.outcome);
        assert!(delivery.sent.is_empty());
    }
}
"#;

const COMMAND_SOURCE: &str = r#"//! {{name}}: a switchyard command. It sends each of its arguments (the manifest's `args`) as
//! one message to `{{name}}-out`, then exits.

use std::process::ExitCode;

wit_bindgen::generate!({
    world: "{{name}}",
    path: "wit",
    generate_all,
});

use wasi::messaging::producer;
use wasi::messaging::types::{Client, Error, Message};

/// Where the messages go (granted by `publish` in {{name}}.toml).
const OUTPUT_TOPIC: &str = "{{name}}-out";

/// Sends each word as a text message; returns how many were sent.
fn send_all(words: &[String]) -> Result<usize, Error> {
    let client = Client::connect("default")?;
    for word in words {
        let message = Message::new(word.as_bytes());
        message.set_content_type("text/plain");
        producer::send(&client, OUTPUT_TOPIC, message)?;
    }
    Ok(words.len())
}

fn main() -> ExitCode {
    let words: Vec<String> = std::env::args().skip(1).collect();
    match send_all(&words) {
        Ok(sent) => {
            eprintln!("{{name}}: sent {sent} messages to {OUTPUT_TOPIC}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("{{name}}: sending failed: {error:?}");
            ExitCode::FAILURE
        }
    }
}

/// Run inside Wasm by `cargo test` (the runner is `switchyard test`, which records sends).
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_one_text_message_per_word() {
        drop(switchyard_test::take_sent());
        let words = ["hello".to_string(), "world".to_string()];
        assert_eq!(send_all(&words).unwrap(), 2);
        let sent = switchyard_test::take_sent();
        let texts: Vec<_> = sent.iter().map(|message| message.text()).collect();
        assert_eq!(texts, ["hello", "world"]);
        assert!(sent.iter().all(|message| message.topic == OUTPUT_TOPIC));
    }
}
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_must_suit_a_crate_a_world_and_a_topic() {
        for good in ["shout", "order-router", "v2-classifier"] {
            assert!(valid_name(good), "{good}");
        }
        for bad in [
            "",
            "Shout",
            "order_router",
            "2fast",
            "a--b",
            "-a",
            "a-",
            "a b",
        ] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn the_helper_is_written_with_its_own_wit() {
        let files = files("shout", Kind::Handler);
        let helper = files
            .iter()
            .find(|(path, _)| path == Path::new("switchyard-test/src/lib.rs"))
            .unwrap();
        assert!(helper.1.contains(HELPER_WIT_PATH.1));
        assert!(!helper.1.contains(HELPER_WIT_PATH.0));
        let names: Vec<_> = files.iter().map(|(path, _)| path.clone()).collect();
        assert!(names.contains(&PathBuf::from("wit/deps/messaging/types.wit")));
        assert!(names.contains(&PathBuf::from("shout.toml")));
        let manifest = &files
            .iter()
            .find(|(p, _)| p == Path::new("shout.toml"))
            .unwrap()
            .1;
        assert!(
            manifest.contains("subscribe = [\"shout-in\"]"),
            "{manifest}"
        );
    }
}
