//! `/v1/vms`: a tenant's microVMs, their lifecycle, console and events.

use axum::body::Body as ResponseBody;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use nubis_api::{ApiError, ErrorCode, ExecEvent, Vm, VmCreate, VmEvent, VmExec, VmState};
use serde::Deserialize;

use super::responses::{
    Authenticated, CannotBeDone, Invalid, TenantChange, TenantOnly, TenantResource,
};
use super::{AppState, Body, Caller, HttpError, Path, Query, Result};
use crate::service::vms::{self, Action};
use crate::supervisor::guest_agent::ExecOutput;
use crate::supervisor::read_console;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/vms", get(list).post(create))
        .route("/v1/vms/{id}", get(show).delete(remove))
        .route("/v1/vms/{id}/start", post(start))
        .route("/v1/vms/{id}/stop", post(stop))
        .route("/v1/vms/{id}/force-stop", post(force_stop))
        .route("/v1/vms/{id}/reboot", post(reboot))
        .route("/v1/vms/{id}/pause", post(pause))
        .route("/v1/vms/{id}/resume", post(resume))
        .route("/v1/vms/{id}/console", get(console))
        .route("/v1/vms/{id}/events", get(events))
        .route("/v1/vms/{id}/exec", post(exec))
}

create_handler!(tenant create, "/v1/vms", "vms", VmCreate, 201 "success", Vm, async vms::create,
    Invalid, TenantOnly,
    (status = 409, description = "the name exists", body = ApiError),
    (status = 422, description = "no such image or network", body = ApiError),
    (status = 429, description = "quota exceeded, or no free address left on a network", body = ApiError),
    (status = 500, description = "the host refused the NICs' rules", body = ApiError),
    (status = 502, description = "an overlay network's home host failed", body = ApiError),
    (status = 507, description = "the host's disk would go below its reserve", body = ApiError));

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListQuery {
    state: Option<String>,
    name: Option<String>,
}

#[utoipa::path(
    get,
    path = "/v1/vms",
    tag = "vms",
    params(("state" = Option<VmState>, Query, description = "only VMs in this state"), ("name" = Option<String>, Query, description = "only the VM with this name")),
    responses(
        (status = 200, description = "success", body = Vec<Vm>),
        Invalid,
        Authenticated
    ),
    security(("bearer" = []))
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Query(query): Query<ListQuery>,
) -> Result<Json<Vec<Vm>>> {
    let wanted = match &query.state {
        Some(text) => Some(VmState::parse(text).ok_or_else(|| {
            HttpError(ApiError::invalid(
                "state",
                format!("unknown state '{text}'"),
            ))
        })?),
        None => None,
    };
    Ok(Json(
        vms::list(
            &state.services,
            caller.service_scope(),
            wanted,
            query.name.as_deref(),
        )
        .await?,
    ))
}

show_handler!(caller show, "/v1/vms/{id}", "vms", "id" = "id (or name)", "success", Vm,
    async vms::get, TenantResource);

/// The lifecycle actions: `POST /v1/vms/{id}/ACTION` does `action` to the
/// caller's VM and answers with the VM; `done` says how it is then, and
/// `extra` are the action's own responses beyond [`TenantChange`].
macro_rules! vm_action {
    ($name:ident, $path:tt, $action:expr, $done:tt $(, $extra:tt)*) => {
        action_handler!(caller $name, $path, "vms", "id" = "id (or name)", $done, Vm,
            async vms::act, $action $(, $extra)*, TenantChange);
    };
}

vm_action!(
    start,
    "/v1/vms/{id}/start",
    Action::Start,
    "running",
    CannotBeDone
);
vm_action!(
    stop,
    "/v1/vms/{id}/stop",
    Action::Stop,
    "stopped (Ctrl-Alt-Del, forced after the agent's timeout)"
);
vm_action!(
    force_stop,
    "/v1/vms/{id}/force-stop",
    Action::ForceStop,
    "stopped"
);
vm_action!(
    reboot,
    "/v1/vms/{id}/reboot",
    Action::Reboot,
    "running again",
    CannotBeDone
);
vm_action!(pause, "/v1/vms/{id}/pause", Action::Pause, "paused");
vm_action!(resume, "/v1/vms/{id}/resume", Action::Resume, "running");

delete_handler!(
    /// Deletes a VM, stopping it at once first if it runs.
    caller remove, "/v1/vms/{id}", "vms", "id" = "id (or name)",
    "deleted (stopped first if it ran)", async vms::delete, TenantResource);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ConsoleQuery {
    #[serde(default)]
    offset: u64,
    #[serde(default)]
    follow: bool,
}

const CONSOLE_CHUNK: usize = 256 * 1024;

/// The serial console log: `offset` resumes a read (the next offset is in
/// `X-Console-Offset`); `follow=true` streams new output until the VM stops.
#[utoipa::path(
    get,
    path = "/v1/vms/{id}/console",
    tag = "vms",
    params(("id" = String, Path, description = "id (or name)"), ("offset" = Option<u64>, Query, description = "byte offset to read from; the next one is in X-Console-Offset"), ("follow" = Option<bool>, Query, description = "stream new output until the VM stops")),
    responses(
        (status = 200, description = "the console log as text", body = String, content_type = "text/plain; charset=utf-8"),
        (status = 400, description = "an unknown or ill-typed query parameter", body = ApiError),
        TenantResource
    ),
    security(("bearer" = []))
)]
pub(crate) async fn console(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(query): Query<ConsoleQuery>,
) -> Result<Response> {
    let (vm, path) = vms::console(&state.services, caller.service_scope(), &id).await?;
    if !query.follow {
        let (data, next) = read_console(&path, query.offset, CONSOLE_CHUNK).map_err(|err| {
            HttpError::new(
                ErrorCode::Internal,
                format!("cannot read the console log: {err}"),
            )
        })?;
        return Ok((
            [
                (
                    header::CONTENT_TYPE,
                    "text/plain; charset=utf-8".to_string(),
                ),
                (
                    header::HeaderName::from_static("x-console-offset"),
                    next.to_string(),
                ),
            ],
            data,
        )
            .into_response());
    }
    let services = state.services.clone();
    let stream = futures_util::stream::unfold((query.offset, false), move |(offset, done)| {
        let (path, services, vm_id) = (path.clone(), services.clone(), vm.id.clone());
        async move {
            if done {
                return None;
            }
            loop {
                let (data, next) = match read_console(&path, offset, CONSOLE_CHUNK) {
                    Ok(read) => read,
                    Err(err) => return Some((Err(err), (offset, true))),
                };
                if !data.is_empty() {
                    return Some((Ok::<_, std::io::Error>(data), (next, false)));
                }
                if !vms::has_process(&services, &vm_id) {
                    return None;
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
    });
    Ok((
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        ResponseBody::from_stream(stream),
    )
        .into_response())
}

show_handler!(caller events, "/v1/vms/{id}/events", "vms", "id" = "id (or name)", "success",
    Vec<VmEvent>, async vms::events, TenantResource);

/// The event a piece of a command's output is.
fn exec_event(output: ExecOutput) -> ExecEvent {
    let text = |bytes: Vec<u8>| String::from_utf8_lossy(&bytes).into_owned();
    match output {
        ExecOutput::Stdout(bytes) => ExecEvent::Stdout { data: text(bytes) },
        ExecOutput::Stderr(bytes) => ExecEvent::Stderr { data: text(bytes) },
        ExecOutput::Exited(code) => ExecEvent::Exit { code },
        ExecOutput::Signalled(number) => ExecEvent::Signal { number },
    }
}

/// Runs a command in the VM through its guest agent (vsock port 52 in the
/// Nubis images): the answer streams the command's output and then its
/// status, one JSON event a line, as the guest sends them.
#[utoipa::path(
    post,
    path = "/v1/vms/{id}/exec",
    tag = "vms",
    params(("id" = String, Path, description = "id (or name)")),
    request_body = VmExec,
    responses(
        (status = 200, description = "the command's output, then its status: one ExecEvent a line", body = ExecEvent, content_type = "application/x-ndjson"),
        Invalid,
        (status = 409, description = "the VM is not running", body = ApiError),
        (status = 502, description = "the guest agent did not answer", body = ApiError),
        TenantResource
    ),
    security(("bearer" = []))
)]
pub(crate) async fn exec(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Body(request): Body<VmExec>,
) -> Result<Response> {
    let (stream, timeout) =
        vms::exec(&state.services, caller.service_scope(), &id, &request).await?;
    let deadline = tokio::time::Instant::now() + timeout;
    let lines = futures_util::stream::unfold(Some(stream), move |stream| async move {
        let mut stream = stream?;
        let (event, rest) = match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Ok(Some(output))) => {
                let last = matches!(output, ExecOutput::Exited(_) | ExecOutput::Signalled(_));
                (exec_event(output), (!last).then_some(stream))
            }
            Ok(Ok(None)) => return None,
            Ok(Err(err)) => (
                ExecEvent::Error {
                    message: err.to_string(),
                },
                None,
            ),
            Err(_) => (
                ExecEvent::Error {
                    message: format!("no status within {} s", timeout.as_secs()),
                },
                None,
            ),
        };
        let mut line = serde_json::to_vec(&event).unwrap_or_default();
        line.push(b'\n');
        Some((Ok::<_, std::io::Error>(line), rest))
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        ResponseBody::from_stream(lines),
    )
        .into_response())
}
