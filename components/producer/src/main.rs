//! The producer: reads Fashion-MNIST images from an IDX file (gzip or plain) in a directory the
//! manifest preopens and sends one request per image, then exits.
//!
//! Each request is the raw 28 × 28 gray8 image with headers `request-id` (`RUN-INDEX`),
//! `sent-at` (Unix milliseconds) and, when a labels file is given, `label`. Sending does not wait
//! for the classifier: the host enqueues each message and confirms delivery in the background.
//!
//! ```text
//! producer --images /data/t10k-images-idx3-ubyte.gz [--labels /data/t10k-labels-idx1-ubyte.gz]
//!          [--topic requests] [--count N] [--rate PER_SECOND] [--run-id ID]
//! ```
//!
//! `--count N` sends N requests (default: one per image in the file). Past the file's end it
//! starts again at its first image, so a long run reuses the test set with its labels while
//! every request keeps an id of its own (INDEX counts requests, not images).
//!
//! Without `--rate` it sends as fast as the host accepts, which measures throughput; with it,
//! it paces the requests, which measures the pipeline's latency below saturation.
//!
//! ```text
//! ```

use std::process::ExitCode;

use pipeline_core::idx::IdxArray;
#[cfg(target_arch = "wasm32")]
use pipeline_core::wire::{GRAY8_CONTENT_TYPE, SENT_AT, format_sent_at, unix_ms};
use pipeline_core::wire::{LABEL, REQUEST_ID};
use pipeline_core::{IMAGE_BYTES, IMAGE_SIDE};

#[cfg(target_arch = "wasm32")]
wit_bindgen::generate!({
    world: "switchyard:host/producer",
    path: "../../wit",
    generate_all,
});

#[derive(Debug, PartialEq)]
struct Settings {
    images: String,
    labels: Option<String>,
    topic: String,
    count: Option<usize>,
    run_id: Option<String>,
    rate: Option<f64>,
}

const USAGE: &str = "usage: producer --images PATH [--labels PATH] [--topic TOPIC] [--count N] \
                     [--rate PER_SECOND] [--run-id ID]";

fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Settings, String> {
    let mut images = None;
    let mut settings = Settings {
        images: String::new(),
        labels: None,
        topic: "requests".into(),
        count: None,
        run_id: None,
        rate: None,
    };
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| format!("{arg} needs a value\n{USAGE}"))
        };
        match arg.as_str() {
            "--images" => images = Some(value()?),
            "--labels" => settings.labels = Some(value()?),
            "--topic" => settings.topic = value()?,
            "--count" => {
                let raw = value()?;
                let count = raw
                    .parse()
                    .map_err(|_| format!("--count takes a number of requests, not {raw:?}"))?;
                settings.count = Some(count);
            }
            "--run-id" => settings.run_id = Some(value()?),
            "--rate" => {
                let raw = value()?;
                let rate = raw
                    .parse::<f64>()
                    .ok()
                    .filter(|r| r.is_finite() && *r > 0.0)
                    .ok_or_else(|| {
                        format!("--rate takes requests per second above 0, not {raw:?}")
                    })?;
                settings.rate = Some(rate);
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    settings.images = images.ok_or_else(|| format!("--images is required\n{USAGE}"))?;
    Ok(settings)
}

/// One request, ready to send.
#[derive(Debug, PartialEq)]
#[cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]
struct Request<'a> {
    pixels: &'a [u8],
    headers: Vec<(&'static str, String)>,
}

fn read_file(path: &str, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| {
        format!(
            "cannot read the {what} file {path}: {e}. The path is inside the component: grant \
             its directory with a `preopens` entry in the manifest"
        )
    })
}

/// Reads the images (and labels) and checks they fit the model.
#[cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]
fn load(settings: &Settings) -> Result<(pipeline_core::idx::Images, Option<Vec<u8>>), String> {
    let images = IdxArray::images(&read_file(&settings.images, "images")?)
        .map_err(|e| format!("{}: {e}", settings.images))?;
    if (images.rows, images.columns) != (IMAGE_SIDE, IMAGE_SIDE) {
        return Err(format!(
            "{}: images are {}x{}, the classifier takes {IMAGE_SIDE}x{IMAGE_SIDE}",
            settings.images, images.rows, images.columns
        ));
    }
    let labels = match &settings.labels {
        Some(path) => {
            let labels = IdxArray::labels(&read_file(path, "labels")?)
                .map_err(|e| format!("{path}: {e}"))?;
            if labels.len() != images.len() {
                return Err(format!(
                    "{path} has {} labels for {} images",
                    labels.len(),
                    images.len()
                ));
            }
            Some(labels)
        }
        None => None,
    };
    Ok((images, labels))
}

/// How many requests `count` (default: one per image) makes of `available` images: none
/// without images.
#[cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]
fn request_count(available: usize, count: Option<usize>) -> usize {
    if available == 0 {
        0
    } else {
        count.unwrap_or(available)
    }
}

/// `count` requests (default: one per image), cycling through the images, headers included
/// except `sent-at`, which is stamped at the moment of sending.
#[cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]
fn requests<'a>(
    images: &'a pipeline_core::idx::Images,
    labels: Option<&'a [u8]>,
    run_id: &'a str,
    count: Option<usize>,
) -> impl Iterator<Item = Request<'a>> + 'a {
    let available = images.len();
    (0..request_count(available, count))
        .filter_map(move |index| Some((index, index % available, images.get(index % available)?)))
        .map(move |(index, image, pixels)| {
            debug_assert_eq!(pixels.len(), IMAGE_BYTES);
            let mut headers = vec![(REQUEST_ID, format!("{run_id}-{index}"))];
            if let Some(label) = labels.and_then(|l| l.get(image)) {
                headers.push((LABEL, label.to_string()));
            }
            Request { pixels, headers }
        })
}

#[cfg(target_arch = "wasm32")]
fn send_all(settings: &Settings) -> Result<usize, String> {
    use wasi::messaging::producer;
    use wasi::messaging::types::{Client, Message};

    let (images, labels) = load(settings)?;
    let run_id = settings
        .run_id
        .clone()
        .unwrap_or_else(|| format!("{:x}", unix_ms() as u64));
    let client =
        Client::connect("default").map_err(|e| format!("cannot connect: {}", describe(&e)))?;
    let mut sent = 0;
    let started = std::time::Instant::now();
    // The host shows how far the producer is (a bar on a terminal, lines in a log).
    let total = request_count(images.len(), settings.count);
    switchyard::host::progress::start("requests", total as u64);
    for request in requests(&images, labels.as_deref(), &run_id, settings.count) {
        if let Some(rate) = settings.rate {
            let due = std::time::Duration::from_secs_f64(sent as f64 / rate);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        let message = Message::new(request.pixels);
        message.set_content_type(GRAY8_CONTENT_TYPE);
        for (name, value) in &request.headers {
            message.add_metadata(name, value);
        }
        message.add_metadata(SENT_AT, &format_sent_at(unix_ms()));
        producer::send(&client, &settings.topic, message).map_err(|e| {
            format!(
                "sending request {sent} to topic {:?} failed: {}",
                settings.topic,
                describe(&e)
            )
        })?;
        sent += 1;
        switchyard::host::progress::set(sent as u64);
    }
    Ok(sent)
}

/// Natively there is no broker to send to: the producer is a component and sends through
/// the host. This build exists for the unit tests.
#[cfg(target_arch = "wasm32")]
fn describe(error: &wasi::messaging::types::Error) -> String {
    use wasi::messaging::types::Error;
    match error {
        Error::Timeout => "the broker did not answer in time".into(),
        Error::Connection(m) => format!("connection: {m}"),
        Error::PermissionDenied(m) => format!("permission denied: {m}"),
        Error::Other(m) => m.clone(),
    }
}

#[cfg(not(target_arch = "wasm32"))]
fn send_all(_: &Settings) -> Result<usize, String> {
    Err(
        "the producer is a WebAssembly component: build it for wasm32-wasip2 and run it with \
         `switchyard run components/producer.toml`"
            .into(),
    )
}

fn main() -> ExitCode {
    let result = parse_args(std::env::args().skip(1)).and_then(|s| send_all(&s));
    match result {
        Ok(sent) => {
            eprintln!("producer: sent {sent} requests");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("producer: {message}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_arguments() {
        let s = parse_args(args(&[
            "--images", "/d/i.gz", "--count", "5", "--topic", "t",
        ]))
        .unwrap();
        assert_eq!(s.images, "/d/i.gz");
        assert_eq!(s.count, Some(5));
        assert_eq!(s.topic, "t");
        assert_eq!(s.labels, None);
        assert!(
            parse_args(args(&["--count", "5"]))
                .unwrap_err()
                .contains("--images is required")
        );
        assert!(
            parse_args(args(&["--images"]))
                .unwrap_err()
                .contains("needs a value")
        );
        assert!(
            parse_args(args(&["--images", "x", "--count", "many"]))
                .unwrap_err()
                .contains("many")
        );
        assert!(
            parse_args(args(&["--bogus"]))
                .unwrap_err()
                .contains("unknown argument")
        );
    }

    fn tiny_set() -> (pipeline_core::idx::Images, Vec<u8>) {
        let mut bytes = vec![0, 0, 8, 3, 0, 0, 0, 3, 0, 0, 0, 28, 0, 0, 0, 28];
        for i in 0..3u8 {
            bytes.extend(std::iter::repeat_n(i, IMAGE_BYTES));
        }
        (IdxArray::images(&bytes).unwrap(), vec![7, 8, 9])
    }

    #[test]
    fn builds_one_request_per_image_by_default_and_cycles_past_the_end() {
        let (images, labels) = tiny_set();
        let all: Vec<_> = requests(&images, Some(&labels), "run", None).collect();
        assert_eq!(all.len(), 3);
        assert_eq!(all[2].pixels, &[2u8; IMAGE_BYTES][..]);
        assert_eq!(
            all[2].headers,
            vec![(REQUEST_ID, "run-2".to_string()), (LABEL, "9".to_string())]
        );
        assert_eq!(requests(&images, None, "r", Some(2)).count(), 2);
        assert_eq!(requests(&images, None, "r", Some(0)).count(), 0);
        // Past the end: the images (and their labels) again, under ids of their own.
        let long: Vec<_> = requests(&images, Some(&labels), "run", Some(7)).collect();
        assert_eq!(long.len(), 7);
        assert_eq!(long[4].pixels, all[1].pixels);
        assert_eq!(
            long[4].headers,
            vec![(REQUEST_ID, "run-4".to_string()), (LABEL, "8".to_string())]
        );
        assert_eq!(long[6].headers[0].1, "run-6");
        assert_eq!(
            requests(&images, None, "r", None)
                .next()
                .unwrap()
                .headers
                .len(),
            1
        );
    }

    fn write_idx(dir: &std::path::Path, name: &str, dims: &[u32], fill: u8) -> String {
        let mut bytes = vec![0, 0, 8, dims.len() as u8];
        for d in dims {
            bytes.extend_from_slice(&d.to_be_bytes());
        }
        bytes.extend(std::iter::repeat_n(
            fill,
            dims.iter().product::<u32>() as usize,
        ));
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path.to_string_lossy().into_owned()
    }

    fn settings(images: String, labels: Option<String>) -> Settings {
        Settings {
            images,
            labels,
            topic: "requests".into(),
            count: None,
            run_id: None,
            rate: None,
        }
    }

    #[test]
    fn loads_images_and_checks_they_fit_the_model() {
        // Inside Wasm there is no temp_dir() nor process id; the test runner preopens a fresh
        // scratch directory at /tmp instead.
        let dir = if cfg!(target_arch = "wasm32") {
            std::path::PathBuf::from("/tmp/producer-test")
        } else {
            std::env::temp_dir().join(format!("producer-test-{}", std::process::id()))
        };
        std::fs::create_dir_all(&dir).unwrap();
        let images = write_idx(&dir, "images", &[2, 28, 28], 1);
        let labels = write_idx(&dir, "labels", &[2], 3);
        let (loaded, labels_loaded) = load(&settings(images.clone(), Some(labels))).unwrap();
        assert_eq!(loaded.len(), 2);
        assert_eq!(labels_loaded, Some(vec![3, 3]));

        let too_few = write_idx(&dir, "few", &[1], 3);
        let err = load(&settings(images, Some(too_few))).unwrap_err();
        assert!(err.contains("1 labels for 2 images"), "{err}");

        let small = write_idx(&dir, "small", &[2, 8, 8], 1);
        let err = load(&settings(small, None)).unwrap_err();
        assert!(err.contains("8x8"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The whole component as the host runs it: what it sends (`switchyard test` records it).
    #[cfg(target_arch = "wasm32")]
    #[test]
    fn sends_one_labelled_gray8_request_per_image_and_cycles() {
        let dir = std::path::Path::new("/tmp/producer-send-test");
        std::fs::create_dir_all(dir).unwrap();
        let images = write_idx(dir, "images", &[2, 28, 28], 9);
        let labels = write_idx(dir, "labels", &[2], 4);
        let settings = Settings {
            count: Some(3),
            run_id: Some("run7".into()),
            topic: "requests-test".into(),
            ..settings(images, Some(labels))
        };
        drop(switchyard_test::take_sent());
        assert_eq!(send_all(&settings), Ok(3));
        let sent = switchyard_test::take_sent();
        assert_eq!(sent.len(), 3);
        for (index, request) in sent.iter().enumerate() {
            assert_eq!(request.topic, "requests-test");
            assert_eq!(request.data, vec![9; IMAGE_BYTES]);
            assert_eq!(request.content_type.as_deref(), Some(GRAY8_CONTENT_TYPE));
            let id = format!("run7-{index}");
            assert_eq!(request.header(REQUEST_ID), Some(id.as_str()));
            assert_eq!(request.header(LABEL), Some("4"));
            let sent_at: f64 = request.header(SENT_AT).unwrap().parse().unwrap();
            assert!(sent_at > 1.7e12, "sent-at is Unix milliseconds: {sent_at}");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn reports_a_missing_file_with_the_fix() {
        let err = read_file("/no/such/file", "images").unwrap_err();
        assert!(err.contains("preopens"), "{err}");
    }
}
