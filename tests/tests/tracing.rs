#![allow(clippy::expect_used, clippy::unwrap_used)]
//! OTLP tracing end to end: a controller and an agent configured with
//! `[tracing] otlp_endpoint`, and `flotctl exec` with `OTEL_EXPORTER_OTLP_ENDPOINT`,
//! all export to an in-test OTLP/gRPC collector; one trace covers the three,
//! with the agent's command span under the controller's `ExecCommand` span and
//! that under flotctl's root span (the context crossed gRPC metadata, then the
//! signed command envelope).

use std::sync::{Arc, Mutex};

use flotilla_tests::{Agent, AgentOpts, Controller, Pki, eventually, flotctl_command, wait_state};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

/// One exported span, as the collector received it.
#[derive(Debug, Clone)]
struct Seen {
    service: String,
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent_span_id: Vec<u8>,
}

/// An OTLP/gRPC trace collector that keeps every span in memory.
#[derive(Debug, Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Seen>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref()?.value.as_ref())
                .map(|v| match v {
                    Value::StringValue(s) => s.clone(),
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            for span in resource_spans.scope_spans.into_iter().flat_map(|s| s.spans) {
                spans.push(Seen {
                    service: service.clone(),
                    name: span.name,
                    trace_id: span.trace_id,
                    span_id: span.span_id,
                    parent_span_id: span.parent_span_id,
                });
            }
        }
        Ok(Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

/// Starts the collector on a free loopback port; returns its `http://` endpoint.
fn start_collector(runtime: &tokio::runtime::Runtime, collector: Collector, stop: CancellationToken) -> String {
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    runtime.spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                stop.cancelled_owned(),
            ),
    );
    format!("http://{addr}")
}

/// The spans above `span` in its trace, nearest first.
fn ancestors<'a>(spans: &'a [Seen], span: &Seen) -> Vec<&'a Seen> {
    let mut chain = Vec::new();
    let mut parent = span.parent_span_id.clone();
    while !parent.is_empty() {
        let Some(up) = spans.iter().find(|s| s.trace_id == span.trace_id && s.span_id == parent) else { break };
        // A loop would be a bug in the exporter or here; never spin on it.
        if chain.len() > spans.len() {
            break;
        }
        chain.push(up);
        parent = up.parent_span_id.clone();
    }
    chain
}

#[test]
fn one_trace_covers_flotctl_the_controller_and_the_agent() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let collector = Collector::default();
    let stop = CancellationToken::new();
    let endpoint = start_collector(&runtime, collector.clone(), stop.clone());

    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let tracing = format!("[tracing]\notlp_endpoint = \"{endpoint}\"\n");
    let controller = Controller::start_configured(dir.path(), &pki, &tracing);
    let url = controller.url();
    // The agent pins the controller's command key, so that it runs the command.
    let key = controller.data_dir.join("command-signing.pub");
    let config = format!("command_key = \"{}\"\n\n{tracing}", key.display());
    let _agent = Agent::start(
        dir.path(),
        &pki,
        &url,
        "gpu-t",
        AgentOpts { gpus: 1, config_toml: Some(config), ..Default::default() },
    );
    wait_state(&pki, &url, "gpu-t", "up");

    let out = flotctl_command(&pki.ca(), &pki.admin(), &url, &["exec", "gpu-t", "noop", "-o", "json"])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    // The daemons export in batches; wait for the agent's command span and its ancestry.
    let (flotctl, exec, command) =
        eventually("one trace with flotctl's, the controller's and the agent's spans", |last| {
            let spans = collector.spans.lock().unwrap().clone();
            *last = format!("{spans:?}");
            let command = spans.iter().find(|s| s.service == "flotilla-agent" && s.name == "command noop")?.clone();
            let above = ancestors(&spans, &command);
            let exec = above
                .iter()
                .find(|s| s.service == "flotilla-controller" && s.name == "flotilla.v1.Fleet/ExecCommand")?;
            let root = above.iter().find(|s| s.service == "flotctl")?;
            Some(((*root).clone(), (*exec).clone(), command))
        });

    assert_eq!(flotctl.name, "flotctl exec");
    assert!(flotctl.parent_span_id.is_empty(), "flotctl's span is the root: {flotctl:?}");
    assert_eq!(flotctl.trace_id.len(), 16);
    for span in [&exec, &command] {
        assert_eq!(span.trace_id, flotctl.trace_id, "one trace: {span:?}");
    }
    // Each process's span hangs directly below a span of the process that called it.
    let spans = collector.spans.lock().unwrap().clone();
    let parent_of = |span: &Seen| ancestors(&spans, span).first().map(|p| p.service.clone());
    assert_eq!(parent_of(&command).as_deref(), Some("flotilla-controller"), "{command:?}");
    let exec_above = ancestors(&spans, &exec);
    assert_eq!(exec_above.last().map(|s| &s.span_id), Some(&flotctl.span_id), "{exec_above:?}");
    assert!(exec_above.iter().all(|s| s.service == "flotilla-controller" || s.service == "flotctl"), "{exec_above:?}");

    stop.cancel();
}
