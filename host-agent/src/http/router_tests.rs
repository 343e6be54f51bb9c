//! The router in-process (`tower::ServiceExt::oneshot`), over a real store
//! in a temporary directory and a host network that changes nothing: the
//! statuses, error codes and messages clients see.

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use nubis_api::Quota;
use serde_json::{json, Value};
use tower::ServiceExt;

use super::router;
use crate::service::testing::{Fixture, OPERATOR_TOKEN};

/// `method path` with `token` and a JSON `body`: the status and the JSON
/// answer (Null for none).
async fn call(
    fixture: &Fixture,
    method: Method,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header("authorization", format!("Bearer {token}"));
    let body = match body {
        Some(body) => {
            request = request.header("content-type", "application/json");
            Body::from(body.to_string())
        }
        None => Body::empty(),
    };
    let request = request.body(body).expect("request");
    let response = router(fixture.state.clone())
        .oneshot(request)
        .await
        .expect("the router answers");
    let status = response.status();
    let bytes = http_body_util::BodyExt::collect(response.into_body())
        .await
        .expect("body")
        .to_bytes();
    let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, value)
}

/// `POST path` with `token` and the JSON `body`: the status and the answer.
async fn post(fixture: &Fixture, path: &str, token: &str, body: Value) -> (StatusCode, Value) {
    call(fixture, Method::POST, path, token, Some(body)).await
}

/// `POST path` with `token` and the JSON `body`, which must create: the
/// answer.
async fn created(fixture: &Fixture, path: &str, token: &str, body: Value) -> Value {
    let (status, answer) = post(fixture, path, token, body).await;
    assert_eq!(status, StatusCode::CREATED, "POST {path}: {answer}");
    answer
}

/// `POST path` of `last`, which must create, then of `one_more`, which
/// must be refused: the tenant's quota is used up.
async fn fills_the_quota(fixture: &Fixture, path: &str, token: &str, last: Value, one_more: Value) {
    created(fixture, path, token, last).await;
    let (status, body) = post(fixture, path, token, one_more).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "POST {path}: {body}");
    assert_eq!(body["error"]["code"], "quota_exceeded");
}

/// Tenant "mine", with image "base", and tenant "theirs": their tokens.
fn mine_and_theirs(fixture: &Fixture) -> (String, String) {
    let (mine, my_token) = fixture.tenant("mine", Quota::default());
    let (_, their_token) = fixture.tenant("theirs", Quota::default());
    fixture.image(&mine, "base", 4096);
    (my_token, their_token)
}

#[tokio::test]
async fn another_tenants_network_and_vm_are_404s() {
    let fixture = Fixture::new();
    let (my_token, their_token) = mine_and_theirs(&fixture);
    let net = json!({"name": "net", "cidr": "10.9.0.0/24"});
    let net = created(&fixture, "/v1/networks", &my_token, net).await;
    let vm = json!({"name": "vm", "image": "base", "nics": [{"network": "net"}]});
    let vm = created(&fixture, "/v1/vms", &my_token, vm).await;
    assert_eq!(vm["nics"][0]["address"], "10.9.0.2/24");
    let net_id = net["id"].as_str().expect("network id");
    let vm_id = vm["id"].as_str().expect("VM id");
    for (method, path, what, id) in [
        (
            Method::GET,
            format!("/v1/networks/{net_id}"),
            "network",
            net_id,
        ),
        (
            Method::DELETE,
            format!("/v1/networks/{net_id}"),
            "network",
            net_id,
        ),
        (Method::GET, format!("/v1/vms/{vm_id}"), "VM", vm_id),
        (Method::DELETE, format!("/v1/vms/{vm_id}"), "VM", vm_id),
        (Method::GET, format!("/v1/vms/{vm_id}/events"), "VM", vm_id),
        (Method::POST, format!("/v1/vms/{vm_id}/start"), "VM", vm_id),
        (Method::GET, "/v1/images/base".to_string(), "image", "base"),
    ] {
        let (status, body) = call(&fixture, method.clone(), &path, &their_token, None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}: {body}");
        assert_eq!(body["error"]["code"], "not_found", "{body}");
        assert_eq!(body["error"]["message"], format!("no {what} '{id}'"));
    }
    let (status, body) = call(&fixture, Method::GET, "/v1/vms", &their_token, None).await;
    assert_eq!((status, body), (StatusCode::OK, json!([])));
    let (status, body) = call(&fixture, Method::GET, "/v1/vms", OPERATOR_TOKEN, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.as_array().map(Vec::len), Some(1), "{body}");
}

#[tokio::test]
async fn quotas_and_exhausted_addresses_are_429s() {
    let fixture = Fixture::new();
    let quota = Quota {
        max_vms: 6,
        max_networks: 1,
        ..Quota::default()
    };
    let (tenant, token) = fixture.tenant("acme", quota);
    fixture.image(&tenant, "base", 4096);
    let small = json!({"name": "small", "cidr": "10.9.0.0/29"});
    let more = json!({"name": "more", "cidr": "10.8.0.0/24"});
    fills_the_quota(&fixture, "/v1/networks", &token, small, more).await;
    let on_small =
        |name: &str| json!({"name": name, "image": "base", "nics": [{"network": "small"}]});
    for index in 0..5 {
        created(&fixture, "/v1/vms", &token, on_small(&format!("vm{index}"))).await;
    }
    let (status, body) = post(&fixture, "/v1/vms", &token, on_small("vm5")).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(
        body["error"]["message"],
        "no free address left in 10.9.0.0/29"
    );
    let vm5 = json!({"name": "vm5", "image": "base"});
    let vm6 = json!({"name": "vm6", "image": "base"});
    fills_the_quota(&fixture, "/v1/vms", &token, vm5, vm6).await;
}

#[tokio::test]
async fn bad_and_undoable_requests_name_their_field() {
    let fixture = Fixture::new();
    let (_, token) = fixture.tenant("acme", Quota::default());
    for (body, status, code, field) in [
        (
            json!({"name": "n", "cidr": "10.9.0.1/24"}),
            StatusCode::BAD_REQUEST,
            "invalid_input",
            "cidr",
        ),
        (
            json!({"name": "n", "cidr": "192.168.7.0/24"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "unprocessable",
            "cidr",
        ),
        (
            json!({"name": "n", "cidr": "10.9.0.0/24", "mtu": 100}),
            StatusCode::BAD_REQUEST,
            "invalid_input",
            "mtu",
        ),
        (
            json!({"name": "n", "cidr": "10.9.0.0/24", "hosts": ["nowhere"]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "unprocessable",
            "hosts[0]",
        ),
    ] {
        let (got, answer) = post(&fixture, "/v1/networks", &token, body.clone()).await;
        assert_eq!(got, status, "{body}: {answer}");
        assert_eq!(answer["error"]["code"], code, "{answer}");
        assert_eq!(answer["error"]["field"], field, "{answer}");
    }
    let vm = json!({"name": "vm", "image": "missing"});
    let (status, answer) = post(&fixture, "/v1/vms", &token, vm).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert_eq!(answer["error"]["field"], "image");
    assert_eq!(answer["error"]["message"], "no image 'missing'");
    let net = json!({"name": "n", "cidr": "10.9.0.0/24"});
    let (status, answer) = post(&fixture, "/v1/networks", OPERATOR_TOKEN, net).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");
}

#[tokio::test]
async fn the_migration_endpoints_answer_in_the_apis_terms() {
    let fixture = Fixture::new();
    let (token, their_token) = mine_and_theirs(&fixture);
    let vm = created(
        &fixture,
        "/v1/vms",
        &token,
        json!({"name": "vm", "image": "base"}),
    )
    .await;
    let path = format!("/v1/vms/{}/migration", vm["id"].as_str().expect("VM id"));
    // This host has no underlay: nothing migrates from here.
    let (status, answer) = post(&fixture, &path, &token, json!({"host": "b"})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert_eq!(answer["error"]["code"], "unprocessable");
    let (status, answer) = post(&fixture, &path, &token, json!({"host": "b", "speed": 1})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert_eq!(answer["error"]["field"], "speed");
    let (status, answer) = call(&fixture, Method::GET, &path, &token, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{answer}");
    assert_eq!(answer["error"]["code"], "not_found");
    let (status, answer) = call(&fixture, Method::DELETE, &path, &token, None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    assert_eq!(answer["error"]["message"], "no migration of this VM runs");
    let (status, _) = call(&fixture, Method::DELETE, &path, &their_token, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // The host-to-host routes are for peers over mutual TLS only.
    let (status, answer) = call(
        &fixture,
        Method::DELETE,
        "/v1/overlay/migrations/vm-0123456789abcdef",
        OPERATOR_TOKEN,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");
}

/// The keys of a JSON object, sorted.
fn keys(value: &Value) -> Vec<String> {
    let mut keys: Vec<String> = value
        .as_object()
        .map(|object| object.keys().cloned().collect())
        .unwrap_or_default();
    keys.sort();
    keys
}

#[tokio::test]
async fn stored_rows_answer_in_the_api_s_shape() {
    let fixture = Fixture::new();
    let tenant = created(
        &fixture,
        "/v1/tenants",
        OPERATOR_TOKEN,
        json!({"name": "acme"}),
    )
    .await;
    assert_eq!(keys(&tenant), ["created_at", "id", "name", "quota"]);
    let tenant_id = tenant["id"].as_str().expect("tenant id");
    let path = format!("/v1/tenants/{tenant_id}");
    let (status, shown) = call(&fixture, Method::GET, &path, OPERATOR_TOKEN, None).await;
    assert_eq!((status, &shown), (StatusCode::OK, &tenant));
    let token = fixture
        .services
        .store
        .create_token(tenant_id)
        .expect("token")
        .token;
    let stored = fixture
        .services
        .store
        .get_tenant(tenant_id)
        .expect("store")
        .expect("tenant");
    fixture.image(&stored.into(), "base", 4096);
    let (status, image) = call(&fixture, Method::GET, "/v1/images/base", &token, None).await;
    assert_eq!(status, StatusCode::OK, "{image}");
    assert_eq!(
        keys(&image),
        [
            "cmdline",
            "created_at",
            "id",
            "kernel",
            "name",
            "rootfs",
            "rootfs_bytes",
            "tenant_id"
        ]
    );
    assert_eq!(image["rootfs_bytes"], 4096);
    let network = json!({"name": "net", "cidr": "10.9.0.0/24"});
    let network = created(&fixture, "/v1/networks", &token, network).await;
    assert_eq!(
        keys(&network),
        [
            "bridge",
            "cidr",
            "created_at",
            "dhcp",
            "dns",
            "gateway",
            "id",
            "mtu",
            "name",
            "nat",
            "tenant_id",
            "vni"
        ]
    );
    assert_eq!(network["gateway"], "10.9.0.1");
    let path = format!("/v1/networks/{}", network["id"].as_str().expect("id"));
    let (status, shown) = call(&fixture, Method::GET, &path, &token, None).await;
    assert_eq!((status, &shown), (StatusCode::OK, &network));
    let (status, listed) = call(&fixture, Method::GET, "/v1/networks", &token, None).await;
    assert_eq!((status, listed), (StatusCode::OK, json!([network])));
}

#[tokio::test]
async fn a_standalone_host_lists_itself_and_refuses_cordoning() {
    let fixture = Fixture::new();
    let (tenant, token) = fixture.tenant("acme", Quota::default());
    fixture.image(&tenant, "base", 4096);
    let (status, hosts) = call(&fixture, Method::GET, "/v1/hosts", OPERATOR_TOKEN, None).await;
    assert_eq!(status, StatusCode::OK, "{hosts}");
    let hosts: Vec<nubis_api::ClusterHost> = serde_json::from_value(hosts).expect("hosts");
    assert_eq!(hosts.len(), 1);
    assert_eq!(hosts[0].state, nubis_api::HostState::Up);
    assert_eq!(hosts[0].vms, Some(0));
    let name = hosts[0].name.clone();
    let (status, _) = call(
        &fixture,
        Method::GET,
        &format!("/v1/hosts/{name}"),
        OPERATOR_TOKEN,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    for (method, path, expected) in [
        (
            Method::GET,
            "/v1/hosts/elsewhere".to_string(),
            StatusCode::NOT_FOUND,
        ),
        (
            Method::GET,
            "/v1/hosts/..%2Fetc".to_string(),
            StatusCode::NOT_FOUND,
        ),
        (
            Method::POST,
            format!("/v1/hosts/{name}/cordon"),
            StatusCode::CONFLICT,
        ),
        (
            Method::DELETE,
            format!("/v1/hosts/{name}"),
            StatusCode::CONFLICT,
        ),
    ] {
        let (status, body) = call(&fixture, method.clone(), &path, OPERATOR_TOKEN, None).await;
        assert_eq!(status, expected, "{method} {path}: {body}");
    }
    // Hosts are the operator's.
    let (status, _) = call(&fixture, Method::GET, "/v1/hosts", &token, None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}
