//! `/metrics` in Prometheus text format (operator only): VMs by state, API
//! requests and their latency by route, and every running VM's device
//! counters as its VMM reports them on the control socket.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use nubis_api::VmState;

use super::{AppState, Operator, Result};

/// Latency histogram bucket bounds, in seconds.
const BUCKETS: [f64; 10] = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0];

#[derive(Default)]
struct RouteStats {
    /// Requests by status code.
    by_status: BTreeMap<u16, u64>,
    /// Cumulative counts per bucket (the last is +Inf).
    buckets: [u64; BUCKETS.len() + 1],
    sum_seconds: f64,
    count: u64,
}

/// API request statistics, keyed by method and route template.
#[derive(Default)]
pub struct ApiMetrics {
    routes: Mutex<BTreeMap<(String, String), RouteStats>>,
}

impl ApiMetrics {
    fn record(&self, method: &str, route: &str, status: u16, seconds: f64) {
        let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        let stats = routes
            .entry((method.to_string(), route.to_string()))
            .or_default();
        *stats.by_status.entry(status).or_default() += 1;
        for (index, bound) in BUCKETS.iter().enumerate() {
            if seconds <= *bound {
                stats.buckets[index] += 1;
            }
        }
        stats.buckets[BUCKETS.len()] += 1;
        stats.sum_seconds += seconds;
        stats.count += 1;
    }

    fn render(&self, out: &mut String) {
        let routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        out.push_str("# HELP nubis_api_requests_total API requests by route and status.\n");
        out.push_str("# TYPE nubis_api_requests_total counter\n");
        for ((method, route), stats) in routes.iter() {
            for (status, count) in &stats.by_status {
                let _ = writeln!(
                    out,
                    "nubis_api_requests_total{{method=\"{method}\",route=\"{route}\",status=\"{status}\"}} {count}"
                );
            }
        }
        out.push_str("# HELP nubis_api_request_duration_seconds API request latency.\n");
        out.push_str("# TYPE nubis_api_request_duration_seconds histogram\n");
        for ((method, route), stats) in routes.iter() {
            let labels = format!("method=\"{method}\",route=\"{route}\"");
            for (index, bound) in BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "nubis_api_request_duration_seconds_bucket{{{labels},le=\"{bound}\"}} {}",
                    stats.buckets[index]
                );
            }
            let _ = writeln!(
                out,
                "nubis_api_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
                stats.buckets[BUCKETS.len()]
            );
            let _ = writeln!(
                out,
                "nubis_api_request_duration_seconds_sum{{{labels}}} {}",
                stats.sum_seconds
            );
            let _ = writeln!(
                out,
                "nubis_api_request_duration_seconds_count{{{labels}}} {}",
                stats.count
            );
        }
    }
}

/// Middleware: times every request under its route template.
pub async fn track(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|path| path.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let method = request.method().to_string();
    let start = Instant::now();
    let response = next.run(request).await;
    state.metrics.record(
        &method,
        &route,
        response.status().as_u16(),
        start.elapsed().as_secs_f64(),
    );
    response
}

pub fn routes() -> Router<AppState> {
    Router::new().route("/metrics", get(metrics))
}

fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"")
}

async fn metrics(State(state): State<AppState>, _operator: Operator) -> Result<Response> {
    let vms = state.store.list_vms(None, None)?;
    let mut out = String::new();
    out.push_str("# HELP nubis_vms VMs on this host by state.\n# TYPE nubis_vms gauge\n");
    for vm_state in VmState::ALL {
        let count = vms.iter().filter(|vm| vm.state == vm_state).count();
        let _ = writeln!(out, "nubis_vms{{state=\"{}\"}} {count}", vm_state.as_str());
    }
    state.metrics.render(&mut out);
    out.push_str(
        "# HELP nubis_vm_device_total Device I/O counters reported by each running VMM.\n",
    );
    out.push_str("# TYPE nubis_vm_device_total counter\n");
    for vm in vms
        .iter()
        .filter(|vm| matches!(vm.state, VmState::Running | VmState::Paused))
    {
        let Ok(status) = state.supervisor.vmm(&vm.id).status().await else {
            continue;
        };
        for device in status.devices {
            let id = escape(&device.id);
            for (name, value) in device.counters {
                let _ = writeln!(
                    out,
                    "nubis_vm_device_total{{vm=\"{}\",tenant=\"{}\",device=\"{id}\",counter=\"{}\"}} {}",
                    escape(&vm.id),
                    escape(&vm.tenant_id),
                    escape(&name),
                    value
                );
            }
        }
    }
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative() {
        let metrics = ApiMetrics::default();
        metrics.record("GET", "/v1/vms", 200, 0.002);
        metrics.record("GET", "/v1/vms", 200, 0.2);
        metrics.record("GET", "/v1/vms", 404, 200.0);
        let mut out = String::new();
        metrics.render(&mut out);
        assert!(
            out.contains(
                r#"nubis_api_requests_total{method="GET",route="/v1/vms",status="200"} 2"#
            ),
            "{out}"
        );
        assert!(out.contains(r#"nubis_api_request_duration_seconds_bucket{method="GET",route="/v1/vms",le="0.005"} 1"#), "{out}");
        assert!(out.contains(r#"nubis_api_request_duration_seconds_bucket{method="GET",route="/v1/vms",le="0.5"} 2"#), "{out}");
        assert!(out.contains(r#"nubis_api_request_duration_seconds_bucket{method="GET",route="/v1/vms",le="+Inf"} 3"#), "{out}");
        assert!(
            out.contains(
                r#"nubis_api_request_duration_seconds_count{method="GET",route="/v1/vms"} 3"#
            ),
            "{out}"
        );
    }
}
