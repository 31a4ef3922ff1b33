//! The deployed `handler` binary: telemetry, settings, app, serve. Nothing else lives here.

use std::process::ExitCode;
use std::time::Instant;

use aoai_fwdproxy::{app, settings::Settings, telemetry};

fn main() -> ExitCode {
    // One core (a Consumption or Flex instance, or a pinned process): the current-thread
    // scheduler, which skips the work-stealing bookkeeping and cross-thread wake-ups of the
    // multi-thread one. More cores: one worker per core, as before.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut builder = if cores == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    // Log lines of a worker wait until it goes idle and go out in one write (telemetry).
    let runtime = builder
        .enable_all()
        .on_thread_park(telemetry::on_worker_park)
        .build();
    match runtime {
        Ok(rt) => {
            let code = rt.block_on(run());
            // the server has drained: every line still waiting goes out (SIGTERM loses none)
            telemetry::flush();
            drop(rt);
            telemetry::flush();
            code
        }
        Err(e) => {
            eprintln!("aoai-fwdproxy cannot start its runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> ExitCode {
    let started = Instant::now();
    telemetry::init();

    let settings = match Settings::load() {
        Ok(s) => s,
        Err(e) => {
            // Both to the log (Application Insights) and to stderr (func start, a terminal).
            tracing::error!(setting = e.name, "refusing to start: {e}");
            eprintln!("aoai-fwdproxy refuses to start: {e}");
            return ExitCode::from(2);
        }
    };
    let addr = app::listen_addr(&settings);
    let grace = settings.shutdown_grace;
    let limits = app::ServerLimits::from_settings(&settings);
    let state = match app::AppState::new(settings).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(setting = e.name, "refusing to start: {e}");
            eprintln!("aoai-fwdproxy refuses to start: {e}");
            return ExitCode::from(2);
        }
    };
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(%addr, error = %e, "cannot listen");
            eprintln!("aoai-fwdproxy cannot listen on {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The port actually bound (FUNCTIONS_CUSTOMHANDLER_PORT=0 asks the OS for a free one, as
    // the tests do and read it back from this line).
    let addr = listener.local_addr().unwrap_or(addr);
    tracing::info!(
        %addr,
        ready_ms = started.elapsed().as_secs_f64() * 1000.0,
        version = env!("CARGO_PKG_VERSION"),
        "ready"
    );
    let served = app::serve_with(
        listener,
        app::router(state.clone()),
        shutdown_signal(),
        grace,
        limits,
    )
    .await;
    // Every abuse record is already durable in the journal; the usage summaries in memory (the
    // open minute) are journaled now. Give the shippers a moment to empty the journals into
    // Cosmos DB (what is left is shipped by the next start).
    let report = state.shutdown().await;
    tracing::info!(
        completed = report.completed,
        pending_bytes = report.pending_bytes,
        "abuse log flushed"
    );
    // Per-resource counters of the forward stage, one line each (the primary first).
    for (index, u) in state.upstream.stats().iter().enumerate() {
        tracing::info!(
            target: "upstream",
            index,
            upstream = u.name.as_str(),
            requests = u.requests,
            throttled = u.throttled,
            server_errors = u.server_errors,
            connect_failures = u.connect_failures,
            cool_downs = u.cool_downs,
            circuit_opens = u.circuit_opens,
            steered_away = u.steered_away,
            state = u.state,
            "upstream counters"
        );
    }
    match served {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "server failed");
            ExitCode::FAILURE
        }
    }
}

/// SIGTERM (the Functions host, App Service) or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
