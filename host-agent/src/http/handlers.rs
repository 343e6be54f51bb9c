//! The handlers every resource has in the same shape (list, show, delete
//! the caller's own; a peer's call about one VM or network), written once: each macro makes the handler and its
//! `utoipa::path` from what differs (path, tag, descriptions, the service
//! function, the responses beyond the shared ones).
//!
//! Why macros: utoipa documents a handler from an attribute on a function,
//! so a generic function cannot carry a resource's path and descriptions;
//! a macro keeps them one line each. A call site must have `State`,
//! `AppState`, `Caller` (or `PeerCaller`), `Path`, `Json`, `StatusCode` and `Result` of
//! `http` in scope, and the response sets it names.

/// A service call, awaited when `async`.
macro_rules! called {
    (sync $call:expr) => {
        $call
    };
    (async $call:expr) => {
        $call.await
    };
}

/// `GET path`: the caller's resources (every tenant's for the operator),
/// from `call(services, scope)`; `ok` describes them.
macro_rules! list_handler {
    ($name:ident, $path:tt, $tag:tt, $ok:tt, $ty:ident, $call:path) => {
        #[utoipa::path(
                    get,
                    path = $path,
                    tag = $tag,
                    responses((status = 200, description = $ok, body = Vec<$ty>), Authenticated),
                    security(("bearer" = []))
                )]
        pub(crate) async fn $name(
            State(state): State<AppState>,
            caller: Caller,
        ) -> Result<Json<Vec<$ty>>> {
            Ok(Json($call(&state.services, caller.service_scope())?))
        }
    };
}

/// `GET path`: one of the caller's resources, from
/// `call(services, scope, id)`; `id` describes the path parameter.
macro_rules! show_handler {
    ($name:ident, $path:tt, $tag:tt, $id:tt, $ty:ident, $call:path $(, $responses:tt)+) => {
        #[utoipa::path(
            get,
            path = $path,
            tag = $tag,
            params(("id" = String, Path, description = $id)),
            responses((status = 200, description = "success", body = $ty), $($responses),+),
            security(("bearer" = []))
        )]
        pub(crate) async fn $name(
            State(state): State<AppState>,
            caller: Caller,
            Path(id): Path<String>,
        ) -> Result<Json<$ty>> {
            Ok(Json($call(
                &state.services,
                caller.service_scope(),
                &id,
            )?))
        }
    };
}

/// `DELETE path`: deletes one of the caller's resources with
/// `call(services, scope, id)` (`sync` or `async`); `done` describes the 204.
macro_rules! delete_handler {
    ($name:ident, $path:tt, $tag:tt, $id:tt, $done:tt, $mode:ident $call:path $(, $responses:tt)+) => {
        #[utoipa::path(
            delete,
            path = $path,
            tag = $tag,
            params(("id" = String, Path, description = $id)),
            responses((status = 204, description = $done), $($responses),+),
            security(("bearer" = []))
        )]
        pub(crate) async fn $name(
            State(state): State<AppState>,
            caller: Caller,
            Path(id): Path<String>,
        ) -> Result<StatusCode> {
            called!($mode $call(&state.services, caller.service_scope(), &id))?;
            Ok(StatusCode::NO_CONTENT)
        }
    };
}

/// `method path` from a peer host (`/v1/overlay`, no bearer token): does
/// `call(services, the peer's address, id)` (`sync` or `async`); `done`
/// describes the 204.
macro_rules! peer_handler {
    ($name:ident, $method:ident, $path:tt, $id:tt, $done:tt, $mode:ident $call:path $(, $responses:tt)+) => {
        #[utoipa::path(
            $method,
            path = $path,
            tag = "overlay",
            params(("id" = String, Path, description = $id)),
            responses((status = 204, description = $done), $($responses),+)
        )]
        pub(crate) async fn $name(
            State(state): State<AppState>,
            peer: PeerCaller,
            Path(id): Path<String>,
        ) -> Result<StatusCode> {
            called!($mode $call(&state.services, &peer.address, &id))?;
            Ok(StatusCode::NO_CONTENT)
        }
    };
}
