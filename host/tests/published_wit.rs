//! Proves that `wit/deps/messaging` declares `wasi:messaging@0.2.0-draft` exactly as the
//! proposal publishes it (WebAssembly/wasi-messaging, `wit/` at commit f027346): the same five
//! files, and in each the same declarations (interfaces, types, resources, functions with their
//! signatures, worlds), line for line once comments and indentation are set aside. The
//! expected declarations below are the published files' without their comments. Comments are
//! switchyard's own and free to differ. The components the other tests run (the pipeline's and
//! the test handler) are built from these declarations, so what they prove holds for a
//! component built against the published WIT.

use std::path::PathBuf;

/// Each published file and its declarations: the file's lines without comments, trimmed,
/// empty lines left out.
const PUBLISHED: [(&str, &str); 5] = [
    (
        "guest.wit",
        r#"interface incoming-handler {
use types.{message, error, topic};
handle: func(message: message) -> result<_, error>;
}"#,
    ),
    (
        "messaging.wit",
        r#"package wasi:messaging@0.2.0-draft;
world imports {
import producer;
}
world imports-request-reply {
include imports;
import request-reply;
}
world messaging-request-reply {
include imports-request-reply;
export incoming-handler;
}
world messaging-core {
include imports;
export incoming-handler;
}"#,
    ),
    (
        "producer.wit",
        r#"interface producer {
use types.{client, message, error, topic};
send: func(c: borrow<client>, topic: topic, message: message) -> result<_, error>;
}"#,
    ),
    (
        "request-reply.wit",
        r#"interface request-reply {
use types.{client, message, error, topic};
resource request-options {
constructor();
set-timeout-ms: func(timeout-ms: u32);
set-expected-replies: func(expected-replies: u32);
}
request: func(c: borrow<client>, topic: topic, message: borrow<message>, options: option<request-options>) -> result<list<message>, error>;
reply: func(reply-to: borrow<message>, message: message) -> result<_, error>;
}"#,
    ),
    (
        "types.wit",
        r#"interface types {
type metadata = list<tuple<string, string>>;
type topic = string;
resource client {
connect: static func(name: string) -> result<client, error>;
disconnect: func() -> result<_, error>;
}
variant error {
timeout,
connection(string),
permission-denied(string),
other(string),
}
resource message {
constructor(data: list<u8>);
topic: func() -> option<topic>;
content-type: func() -> option<string>;
set-content-type: func(content-type: string);
data: func() -> list<u8>;
set-data: func(data: list<u8>);
metadata: func() -> option<metadata>;
add-metadata: func(key: string, value: string);
set-metadata: func(meta: metadata);
remove-metadata: func(key: string);
}
}"#,
    ),
];

/// A WIT file's declarations: its lines without `//` comments (doc comments included),
/// trimmed, without empty lines.
fn declarations(wit: &str) -> String {
    wit.lines()
        .map(|line| match line.find("//") {
            Some(comment) => &line[..comment],
            None => line,
        })
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join("\n")
}

fn messaging_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../wit/deps/messaging")
}

#[test]
fn the_messaging_package_is_the_five_published_files() {
    let mut files: Vec<String> = std::fs::read_dir(messaging_dir())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    let published: Vec<&str> = PUBLISHED.iter().map(|(file, _)| *file).collect();
    assert_eq!(files, published);
}

#[test]
fn each_file_declares_what_was_published() {
    for (file, published) in PUBLISHED {
        let ours = declarations(&std::fs::read_to_string(messaging_dir().join(file)).unwrap());
        for (line, (ours, published)) in ours.lines().zip(published.lines()).enumerate() {
            assert_eq!(ours, published, "{file}, declaration line {}", line + 1);
        }
        assert_eq!(
            ours.lines().count(),
            published.lines().count(),
            "{file}: {ours}"
        );
    }
}

#[test]
fn comments_are_not_declarations() {
    assert_eq!(
        declarations("/// A doc.\n  interface a {  // why\n\n    f: func();\n}\n"),
        "interface a {\nf: func();\n}"
    );
}
