//! A handler component for the host's runtime tests: each message's payload is a command that
//! makes it behave well or badly, so the tests can check what the host does about it.
//!
//! | payload | behaviour |
//! | --- | --- |
//! | `ok` | returns `ok` |
//! | `error` | returns a WIT `error` |
//! | `trap` | panics (a trap) |
//! | `spin` | loops until the host interrupts it |
//! | `sleep MS` | sleeps MS milliseconds (waiting in a host call, not running Wasm) |
//! | `announce TOPIC MS` | sends `sleeping` to TOPIC, then sleeps MS milliseconds |
//! | `connect ADDR` | opens a TCP connection to ADDR and returns `error` with what happened |
//! | `udp ADDR` | sends one UDP datagram to ADDR and returns `error` with what happened |
//! | `resolve NAME` | looks NAME up in DNS and returns `error` with what happened |
//! | `big BYTES` | creates (and drops) a message of BYTES bytes |
//! | `hoard N BYTES` | creates N messages of BYTES bytes each and keeps them |
//! | `flood TOPIC N` | sends N messages to TOPIC; `error` with how many went and why it stopped |
//! | `grow MB` | allocates and touches `MB` MiB of memory |
//! | `count TOPIC` | sends to TOPIC how many messages this instance has handled so far |
//! | `send TOPIC` | sends `hello` to TOPIC and returns what the host said |
//! | `echo TOPIC ...` | sends its own payload to TOPIC (so a test can tell messages apart) |
//! | `batch TOPIC` | sends to TOPIC how many messages came in the same call |
//! | `attempt TOPIC N` | sends its `switchyard-delivery-attempt` metadata to TOPIC; `error` before attempt N |
//! | `probe TOPIC` | tries what the sandbox should refuse and sends to TOPIC what happened (below) |
//! | `warmed TOPIC` | sends to TOPIC `WARM-UPS HANDLED`: this instance's warm-ups, and the messages it handled before this one |
//!
//! `probe` reports one `name=outcome` line each (`ok` or `denied: …`) for: reading
//! `/etc/passwd` (outside every preopen), reading `/data/probe.txt` and writing
//! `/data/written.txt` (for a test that preopens `/data` read-only), and the number of
//! environment variables.
//!
//! It exports `switchyard:host/batch` too, handling a batch's messages one after the other, so
//! one `trap` fails the whole call, and `switchyard:host/warm-up`, which does what its
//! argument `--warm-up MODE` says: `ok` (the default), `sleep MS`, `error`, `trap`, or
//! `send TOPIC` (tries to send, and fails with what the host said).
//! It is not part of the pipeline and not meant for production.

#[cfg(target_arch = "wasm32")]
mod component {
    use std::cell::Cell;

    wit_bindgen::generate!({
        inline: "
            package switchyard:test-handler;

            world test-handler {
                include switchyard:host/batch-handler@0.1.0;
                export switchyard:host/warm-up@0.1.0;
            }
        ",
        path: "../../wit",
        world: "switchyard:test-handler/test-handler",
        generate_all,
    });

    use exports::switchyard::host::{batch, warm_up};
    use exports::wasi::messaging::incoming_handler::Guest;
    use wasi::messaging::producer;
    use wasi::messaging::types::{Client, Error, Message};

    thread_local! {
        static HANDLED: Cell<u64> = const { Cell::new(0) };
        static WARM_UPS: Cell<u64> = const { Cell::new(0) };
    }

    fn send(topic: &str, body: &[u8]) -> Result<(), Error> {
        let client = Client::connect("test")?;
        producer::send(&client, topic, Message::new(body))
    }

    struct Component;

    impl warm_up::Guest for Component {
        fn warm_up() -> Result<(), Error> {
            WARM_UPS.with(|w| w.set(w.get() + 1));
            let mut args = std::env::args()
                .skip_while(|arg| arg != "--warm-up")
                .skip(1);
            let mode = args.next().unwrap_or_else(|| "ok".into());
            let mut words = mode.split_whitespace();
            match (words.next(), words.next()) {
                (Some("ok"), _) => Ok(()),
                (Some("sleep"), Some(ms)) => {
                    let ms: u64 = ms.parse().map_err(|_| Error::Other("sleep MS".into()))?;
                    std::thread::sleep(std::time::Duration::from_millis(ms));
                    Ok(())
                }
                (Some("error"), _) => Err(Error::Other("asked to fail its warm-up".into())),
                (Some("trap"), _) => panic!("asked to trap in its warm-up"),
                (Some("send"), Some(topic)) => {
                    send(topic, b"from warm-up")?;
                    Err(Error::Other("the send during warm-up went out".into()))
                }
                _ => Err(Error::Other(format!("no warm-up mode {mode:?}"))),
            }
        }
    }

    impl batch::Guest for Component {
        fn handle_batch(messages: Vec<Message>) -> Vec<Result<(), Error>> {
            let size = messages.len();
            messages.into_iter().map(|m| handle(m, size)).collect()
        }
    }

    impl Guest for Component {
        fn handle(message: Message) -> Result<(), Error> {
            handle(message, 1)
        }
    }

    /// One message that came in a call with `size` messages.
    fn handle(message: Message, size: usize) -> Result<(), Error> {
        let handled = HANDLED.with(|h| {
            h.set(h.get() + 1);
            h.get()
        });
        let payload = String::from_utf8_lossy(&message.data()).into_owned();
        let mut words = payload.split_whitespace();
        match (words.next(), words.next()) {
            (Some("ok"), _) => Ok(()),
            (Some("error"), _) => Err(Error::Other("asked to fail".into())),
            (Some("trap"), _) => panic!("asked to trap"),
            (Some("spin"), _) => {
                let mut x = 0u64;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            (Some("sleep"), Some(ms)) => {
                let ms: u64 = ms.parse().map_err(|_| Error::Other("sleep MS".into()))?;
                std::thread::sleep(std::time::Duration::from_millis(ms));
                Ok(())
            }
            (Some("announce"), Some(topic)) => {
                let ms: u64 = words
                    .next()
                    .and_then(|ms| ms.parse().ok())
                    .ok_or_else(|| Error::Other("announce TOPIC MS".into()))?;
                send(topic, b"sleeping")?;
                std::thread::sleep(std::time::Duration::from_millis(ms));
                Ok(())
            }
            (Some("connect"), Some(address)) => {
                Err(Error::Other(match std::net::TcpStream::connect(address) {
                    Ok(_) => "connect: connected".to_string(),
                    Err(e) => format!("connect: denied: {e}"),
                }))
            }
            (Some("udp"), Some(address)) => {
                let sent = std::net::UdpSocket::bind("0.0.0.0:0")
                    .and_then(|socket| socket.send_to(b"out of the sandbox", address));
                Err(Error::Other(match sent {
                    Ok(bytes) => format!("udp: sent {bytes} bytes"),
                    Err(e) => format!("udp: denied: {e}"),
                }))
            }
            (Some("resolve"), Some(name)) => {
                use std::net::ToSocketAddrs;
                Err(Error::Other(match (name, 80).to_socket_addrs() {
                    Ok(addresses) => {
                        format!("resolve: resolved {:?}", addresses.collect::<Vec<_>>())
                    }
                    Err(e) => format!("resolve: denied: {e}"),
                }))
            }
            (Some("big"), Some(bytes)) => {
                let bytes: usize = bytes
                    .parse()
                    .map_err(|_| Error::Other("big BYTES".into()))?;
                drop(Message::new(&vec![7u8; bytes]));
                Ok(())
            }
            (Some("hoard"), Some(count)) => {
                let count: usize = count.parse().map_err(|_| Error::Other("hoard N".into()))?;
                let bytes: usize = words.next().and_then(|b| b.parse().ok()).unwrap_or(1);
                for _ in 0..count {
                    std::mem::forget(Message::new(&vec![7u8; bytes]));
                }
                Ok(())
            }
            (Some("flood"), Some(topic)) => {
                let count: usize = words.next().and_then(|n| n.parse().ok()).unwrap_or(1);
                let client = Client::connect("test")?;
                for sent in 0..count {
                    if let Err(e) = producer::send(&client, topic, Message::new(b"flood")) {
                        return Err(Error::Other(format!("sent {sent}, then: {e:?}")));
                    }
                }
                Err(Error::Other(format!("sent {count}")))
            }
            (Some("grow"), Some(mb)) => {
                let mb: usize = mb.parse().map_err(|_| Error::Other("grow MB".into()))?;
                let block = vec![1u8; mb << 20];
                std::hint::black_box(&block);
                Ok(())
            }
            (Some("count"), Some(topic)) => send(topic, handled.to_string().as_bytes()),
            (Some("send"), Some(topic)) => send(topic, b"hello"),
            (Some("echo"), Some(topic)) => send(topic, payload.as_bytes()),
            (Some("batch"), Some(topic)) => send(topic, size.to_string().as_bytes()),
            (Some("probe"), Some(topic)) => send(topic, probe().as_bytes()),
            (Some("warmed"), Some(topic)) => {
                let warm_ups = WARM_UPS.with(Cell::get);
                send(topic, format!("{warm_ups} {}", handled - 1).as_bytes())
            }
            (Some("attempt"), Some(topic)) => {
                let succeed_at: u32 = words
                    .next()
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| Error::Other("attempt TOPIC N".into()))?;
                let attempt = message
                    .metadata()
                    .unwrap_or_default()
                    .into_iter()
                    .find(|(name, _)| name == "switchyard-delivery-attempt")
                    .map(|(_, value)| value);
                let said = attempt.clone().unwrap_or_else(|| "none".into());
                send(topic, said.as_bytes())?;
                match attempt.and_then(|a| a.parse::<u32>().ok()) {
                    Some(attempt) if attempt >= succeed_at => Ok(()),
                    _ => Err(Error::Other(format!(
                        "attempt {said}: failing until {succeed_at}"
                    ))),
                }
            }
            _ => Err(Error::Other(format!("unknown command {payload:?}"))),
        }
    }

    /// What the sandbox lets this instance do, one `name=outcome` line each.
    fn probe() -> String {
        let outcome = |result: std::io::Result<()>| match result {
            Ok(()) => "ok".to_string(),
            Err(e) => format!("denied: {e}"),
        };
        [
            (
                "read-outside",
                outcome(std::fs::read("/etc/passwd").map(drop)),
            ),
            (
                "read-inside",
                outcome(std::fs::read("/data/probe.txt").map(drop)),
            ),
            (
                "write-read-only",
                outcome(std::fs::write("/data/written.txt", b"x")),
            ),
            ("env", std::env::vars().count().to_string()),
        ]
        .iter()
        .map(|(name, outcome)| format!("{name}={outcome}\n"))
        .collect()
    }

    export!(Component);
}
