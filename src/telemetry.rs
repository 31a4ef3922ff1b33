//! Logging: tracing, one JSON object per line on stdout (the Functions host collects stdout into
//! Application Insights).
//!
//! The default filter keeps the HTTP and TLS libraries at `warn`: at debug level some of them
//! print headers, and headers carry keys. `RUST_LOG` overrides the filter for a deliberate
//! debugging session.

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

/// The filter used when `RUST_LOG` is unset.
pub const DEFAULT_FILTER: &str = "info,hyper=warn,hyper_util=warn,h2=warn,reqwest=warn,rustls=warn";

/// Install the global JSON subscriber writing to stdout.
pub fn init() {
    init_with_writer(std::io::stdout);
}

/// Install the global JSON subscriber writing to `writer` (tests capture logs with this).
pub fn init_with_writer<W>(writer: W)
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let _ = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(false)
        .with_target(true)
        .with_env_filter(filter)
        .with_writer(writer)
        .try_init();
}
