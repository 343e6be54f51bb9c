//! The handlers that share a shape (list, show, create, act on one,
//! delete; a peer's call about one VM or network), written once: each
//! macro makes the handler and its `utoipa::path` from what differs (who
//! may call, path, tag, descriptions, the service function, the responses
//! beyond the shared ones). A handler with logic of its own is written
//! out where it is.
//!
//! Why macros: utoipa documents a handler from an attribute on a function,
//! so a generic function cannot carry a resource's path and descriptions;
//! a macro keeps them a few lines each. A call site must have `State`,
//! `AppState`, `Caller` or `Operator` (or `PeerCaller`), `Path`, `Body`,
//! `Json`, `StatusCode` and `Result` of `http` in scope (those it uses),
//! and the response sets it names.

/// A service call, awaited when `async`.
macro_rules! called {
    (sync $call:expr) => {
        $call
    };
    (async $call:expr) => {
        $call.await
    };
}

/// Who may call a handler made by the macros below, and what its service
/// function is told of them:
/// - `caller`: any token; the service gets what the caller sees (its
///   scope, every tenant's for the operator);
/// - `tenant`: a tenant's token, the operator's is a 403; the service gets
///   the tenant (for what a tenant creates: the operator owns nothing);
/// - `operator`: the operator's token only, a tenant's is a 403 before the
///   rest of the request is looked at; the service gets nothing.
///
/// Calls `then!` with `[binding: Extractor] [arguments,]` first: made
/// here together, so that the arguments name the binding (hygiene).
macro_rules! who {
    (caller, $then:ident!($($rest:tt)*)) => {
        $then!([caller: Caller] [caller.service_scope(),] $($rest)*);
    };
    (tenant, $then:ident!($($rest:tt)*)) => {
        $then!([caller: Caller] [caller.tenant()?,] $($rest)*);
    };
    (operator, $then:ident!($($rest:tt)*)) => {
        $then!([_operator: Operator] [] $($rest)*);
    };
}

/// `who GET path`: every resource the caller sees, from `call(services,
/// who)`; `ok` describes them.
macro_rules! list_handler {
    ([$caller:ident: $who:ident] [$($told:tt)*] $name:ident, $path:tt, $tag:tt, $ok:tt, $ty:ident,
        $mode:ident $call:path $(, $responses:tt)+) => {
        #[utoipa::path(
            get,
            path = $path,
            tag = $tag,
            responses((status = 200, description = $ok, body = Vec<$ty>), $($responses),+),
            security(("bearer" = []))
        )]
        pub(crate) async fn $name(
            State(state): State<AppState>,
            $caller: $who,
        ) -> Result<Json<Vec<$ty>>> {
            Ok(Json(called!($mode $call(&state.services, $($told)*))?))
        }
    };
    ($who:ident $($rest:tt)+) => {
        who!($who, list_handler!($($rest)+));
    };
}

/// `who GET path`: one resource, from `call(services, who, id)`; `param =
/// id` names and describes the path parameter, `ok` the answer.
/// `action_handler!` makes its handlers here too.
macro_rules! show_handler {
    ([$caller:ident: $who:ident] [$($told:tt)*] $method:ident [$($arg:expr)?] $name:ident, $path:tt,
        $tag:tt, $param:tt = $id:tt, $ok:tt, $ty:ident $(<$item:ident>)?, $mode:ident $call:path
        $(, $responses:tt)+) => {
        #[utoipa::path(
            $method,
            path = $path,
            tag = $tag,
            params(($param = String, Path, description = $id)),
            responses((status = 200, description = $ok, body = $ty $(<$item>)?), $($responses),+),
            security(("bearer" = []))
        )]
        pub(crate) async fn $name(
            State(state): State<AppState>,
            $caller: $who,
            Path(id): Path<String>,
        ) -> Result<Json<$ty $(<$item>)?>> {
            Ok(Json(called!($mode $call(&state.services, $($told)* &id $(, $arg)?))?))
        }
    };
    ($who:ident $($rest:tt)+) => {
        who!($who, show_handler!(get [] $($rest)+));
    };
}

/// `who POST path`: does `call(services, who, id, arg)` to one resource
/// and answers with it; `param = id` names and describes the path
/// parameter, `done` says how the resource is then.
macro_rules! action_handler {
    ($who:ident $name:ident, $path:tt, $tag:tt, $param:tt = $id:tt, $done:tt, $ty:ident,
        $mode:ident $call:path, $arg:expr $(, $responses:tt)+) => {
        who!($who, show_handler!(post [$arg] $name, $path, $tag, $param = $id, $done, $ty,
            $mode $call $(, $responses)+));
    };
}

/// `who POST path`: creates a resource with `call(services, who, [id,]
/// [body])` and answers `status` (201, or 202 for what runs on) with it;
/// `done` describes the answer. Between tag and status, in this order:
/// `param = id` where the path has a parameter (names and describes it),
/// the `Body` type where there is one (`&Body` where the service borrows
/// it).
macro_rules! create_handler {
    ([$caller:ident: $who:ident] [$($told:tt)*] $name:ident, $path:tt, $tag:tt,
        [$($param:tt = $id:tt)?] [$([$($by:tt)?] $body:ident)?] $status:tt $done:tt, $ty:ident,
        $mode:ident $call:path $(, $responses:tt)+) => {
        #[utoipa::path(
            post,
            path = $path,
            tag = $tag,
            $(params(($param = String, Path, description = $id)),)?
            $(request_body = $body,)?
            responses((status = $status, description = $done, body = $ty), $($responses),+),
            security(("bearer" = []))
        )]
        pub(crate) async fn $name(
            State(state): State<AppState>,
            $caller: $who,
            $(Path(id): Path<skip!($param String)>,)?
            $(Body(request): Body<$body>,)?
        ) -> Result<(StatusCode, Json<$ty>)> {
            let created = called!($mode $call(
                &state.services,
                $($told)*
                $(skip!($param &id),)?
                $(skip!($body $($by)? request))?
            ))?;
            Ok((status!($status), Json(created)))
        }
    };
    // What a call site gives, made the first rule's: the path parameter,
    // then the body, each in brackets, empty when there is none.
    (@body $who:ident $name:ident, $path:tt, $tag:tt, $id:tt & $body:ident, $($rest:tt)+) => {
        who!($who, create_handler!($name, $path, $tag, $id [[&] $body] $($rest)+));
    };
    (@body $who:ident $name:ident, $path:tt, $tag:tt, $id:tt $body:ident, $($rest:tt)+) => {
        who!($who, create_handler!($name, $path, $tag, $id [[] $body] $($rest)+));
    };
    (@body $who:ident $name:ident, $path:tt, $tag:tt, $id:tt $($rest:tt)+) => {
        who!($who, create_handler!($name, $path, $tag, $id [] $($rest)+));
    };
    ($who:ident $name:ident, $path:tt, $tag:tt, $param:tt = $id:tt, $($rest:tt)+) => {
        create_handler!(@body $who $name, $path, $tag, [$param = $id] $($rest)+);
    };
    ($who:ident $name:ident, $path:tt, $tag:tt, $($rest:tt)+) => {
        create_handler!(@body $who $name, $path, $tag, [] $($rest)+);
    };
}

/// The `StatusCode` of a status `create_handler!` answers with.
macro_rules! status {
    (201) => {
        StatusCode::CREATED
    };
    (202) => {
        StatusCode::ACCEPTED
    };
}

/// What follows the first token, for a repetition that must name a
/// variable it does not use.
macro_rules! skip {
    ($skipped:tt $($kept:tt)*) => {
        $($kept)*
    };
}

/// `who DELETE path` (with the handler's doc comments first, if any):
/// deletes one resource with `call(services, who, id)`; `param = id` names
/// and describes the path parameter, `done` the 204.
macro_rules! delete_handler {
    ([$caller:ident: $who:ident] [$($told:tt)*] $(#[doc = $doc:tt])* $name:ident, $path:tt, $tag:tt,
        $param:tt = $id:tt, $done:tt, $mode:ident $call:path $(, $responses:tt)+) => {
        $(#[doc = $doc])*
        #[utoipa::path(
            delete,
            path = $path,
            tag = $tag,
            params(($param = String, Path, description = $id)),
            responses((status = 204, description = $done), $($responses),+),
            security(("bearer" = []))
        )]
        pub(crate) async fn $name(
            State(state): State<AppState>,
            $caller: $who,
            Path(id): Path<String>,
        ) -> Result<StatusCode> {
            called!($mode $call(&state.services, $($told)* &id))?;
            Ok(StatusCode::NO_CONTENT)
        }
    };
    ($(#[doc = $doc:tt])* $who:ident $($rest:tt)+) => {
        who!($who, delete_handler!($(#[doc = $doc])* $($rest)+));
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
