//! Logging: `RUST_LOG` as Rust users expect, with `ZCIO_LOG` kept as zcio's own name for it.
//!
//! Both take `tracing-subscriber`'s filter syntax (`debug`, `zcio=debug,zcio_tcp=trace`, ...).
//! `ZCIO_LOG` wins when both are set; with neither, warnings and errors are shown. At
//! `debug`, every connection and every request has a span: the client's
//! `request{op=.. peer=..}` (the transport logs the request id inside it), the server's
//! `conn{peer=..}` and `request{peer=.. id=.. op=..}`, so one request can be followed by its
//! id from the client through the transport to the server and back.

use tracing_subscriber::EnvFilter;

/// The filter directives to use and where they came from (`ZCIO_LOG`, then `RUST_LOG`,
/// then the default, `warn`). An empty variable counts as unset.
fn directives(zcio_log: Option<String>, rust_log: Option<String>) -> (String, &'static str) {
    let set = |v: Option<String>| v.filter(|s| !s.trim().is_empty());
    match (set(zcio_log), set(rust_log)) {
        (Some(z), _) => (z, "ZCIO_LOG"),
        (None, Some(r)) => (r, "RUST_LOG"),
        (None, None) => ("warn".into(), "the default"),
    }
}

/// Installs the global subscriber, writing to stderr. A filter that does not parse is
/// reported and replaced by the default instead of being silently ignored.
pub(crate) fn init() {
    let (text, from) = directives(
        std::env::var("ZCIO_LOG").ok(),
        std::env::var("RUST_LOG").ok(),
    );
    let filter = EnvFilter::try_new(&text).unwrap_or_else(|e| {
        eprintln!("zcio: warning: ignoring {from}={text:?}: {e}; logging warnings only");
        EnvFilter::new("warn")
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

#[cfg(test)]
mod tests {
    use super::directives;

    #[test]
    fn zcio_log_then_rust_log_then_warn() {
        let s = |v: &str| Some(v.to_string());
        assert_eq!(directives(None, None), ("warn".into(), "the default"));
        assert_eq!(directives(None, s("debug")), ("debug".into(), "RUST_LOG"));
        assert_eq!(
            directives(s("zcio=trace"), s("debug")),
            ("zcio=trace".into(), "ZCIO_LOG")
        );
        assert_eq!(directives(s(" "), s("info")), ("info".into(), "RUST_LOG"));
        assert_eq!(directives(s(""), s("")), ("warn".into(), "the default"));
    }
}
