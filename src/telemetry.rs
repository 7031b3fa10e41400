//! Telemetry: structured logs and per-event traces through `tracing`.
//!
//! - stdout: human-readable or one JSON object per line (`timestamp`, `level`, `target`, `message`
//!   and the event's fields), as `log.format` says;
//! - `log.file`: the same events as JSON lines appended to a file, written off the hot path
//!   (Filebeat ships it; logrotate's `copytruncate` rotates it);
//! - `traces.otlp_endpoint`: the per-event spans (`event` with children `decode`, `features`,
//!   `models`, `consensus`, `publish`, `acknowledge`) exported over OTLP/HTTP. The spans are at
//!   TRACE level, so with no exporter and the usual log filter their call sites are disabled and
//!   cost one cached check each.
//!
//! `RUST_LOG` overrides `log.filter`.

use std::fs::OpenOptions;
use std::path::PathBuf;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::prelude::*;
use tracing_subscriber::{EnvFilter, Layer, Registry, fmt};

use crate::config::{Config, LogFormat, TraceConfig};

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("log file {path}: {source}")]
    LogFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("OTLP exporter: {0}")]
    Exporter(String),
}

/// Keeps the log file writer and the trace exporter alive; dropping it flushes both.
#[must_use = "dropping Telemetry stops the log file writer and the trace exporter"]
pub struct Telemetry {
    _file: Option<WorkerGuard>,
    tracer: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.tracer.take() {
            // Exports the spans still queued; an unreachable collector only costs its timeout.
            let _ = provider.shutdown();
        }
    }
}

fn filter(directives: &str) -> EnvFilter {
    EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(directives))
        .unwrap_or_else(|_| EnvFilter::new("info"))
}

/// One layer of the subscriber, boxed so that the set can be chosen at run time.
pub type BoxedLayer = Box<dyn Layer<Registry> + Send + Sync>;

fn json_layer<W>(writer: W) -> BoxedLayer
where
    W: for<'w> fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    fmt::layer()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(false)
        .with_writer(writer)
        .boxed()
}

/// The span exporter, or `None` when tracing is off.
fn tracer_provider(cfg: &TraceConfig) -> Result<Option<SdkTracerProvider>, TelemetryError> {
    let Some(endpoint) = &cfg.endpoint else {
        return Ok(None);
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            cfg.sample_ratio,
        ))))
        .with_resource(
            Resource::builder()
                .with_service_name(cfg.service_name.clone())
                .build(),
        )
        .build();
    Ok(Some(provider))
}

/// Installs the global subscriber. A second call installs nothing and returns a no-op guard.
pub fn init(cfg: &Config) -> Result<Telemetry, TelemetryError> {
    let (layers, telemetry) = layers(cfg, std::io::stdout)?;
    let installed = tracing_subscriber::registry()
        .with(layers)
        .try_init()
        .is_ok();
    Ok(if installed {
        telemetry
    } else {
        Telemetry {
            _file: None,
            tracer: None,
        }
    })
}

/// The layers `init` installs, with `console` in place of stdout (benchmarks pass a sink).
pub fn layers<W>(cfg: &Config, console: W) -> Result<(Vec<BoxedLayer>, Telemetry), TelemetryError>
where
    W: for<'w> fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let stdout = match cfg.log_format {
        LogFormat::Json => json_layer(console),
        LogFormat::Pretty => fmt::layer()
            .with_target(false)
            .compact()
            .with_writer(console)
            .boxed(),
    };
    let mut layers: Vec<BoxedLayer> = vec![stdout.with_filter(filter(&cfg.log_filter)).boxed()];

    let guard = match &cfg.log_file {
        Some(path) => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|source| TelemetryError::LogFile {
                    path: path.clone(),
                    source,
                })?;
            }
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| TelemetryError::LogFile {
                    path: path.clone(),
                    source,
                })?;
            let (writer, guard) = tracing_appender::non_blocking(f);
            layers.push(
                json_layer(writer)
                    .with_filter(filter(&cfg.log_filter))
                    .boxed(),
            );
            Some(guard)
        }
        None => None,
    };

    let provider = tracer_provider(&cfg.traces)?;
    if let Some(p) = &provider {
        layers.push(
            tracing_opentelemetry::layer()
                .with_tracer(p.tracer("vigil"))
                .with_filter(filter_fn(|m| {
                    m.is_span() && m.target().starts_with("vigil")
                }))
                .boxed(),
        );
    }

    Ok((
        layers,
        Telemetry {
            _file: guard,
            tracer: provider,
        },
    ))
}
