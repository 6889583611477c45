//! The REST API, version 1.0 (`/1.0/...`): routes, who may call each (`ROUTES`, checked on
//! every request), JSON errors, the audit log of mutating calls, and request limits. The
//! same router serves the local UNIX socket (full access) and the TLS listener (the client
//! certificate's role, looked up on every request so a revocation takes effect at once).
//! The OpenAPI document (`docs/openapi.json`) is served as it is kept in the repository.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, MatchedPath, Path, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Serialize;
use serde_json::{Value, json};

use super::Daemon;
use super::sandboxes::CreateRequest;
use super::store::PolicySource;
use crate::daemon::auth::{Caller, Role};

/// The OpenAPI document, as kept in the repository.
pub const OPENAPI: &str = include_str!("../../../../docs/openapi.json");

/// Every route, with the least role that may call it (`None`: anyone, even an untrusted
/// client, e.g. to present a join token). The OpenAPI document lists the same routes.
pub const ROUTES: &[(&str, &str, Option<Role>)] = &[
    ("GET", "/1.0", None),
    ("GET", "/1.0/openapi.json", Some(Role::Auditor)),
    ("GET", "/1.0/sandboxes", Some(Role::Auditor)),
    ("POST", "/1.0/sandboxes", Some(Role::Operator)),
    ("GET", "/1.0/sandboxes/{name}", Some(Role::Auditor)),
    ("DELETE", "/1.0/sandboxes/{name}", Some(Role::Operator)),
    ("GET", "/1.0/sandboxes/{name}/policy", Some(Role::Auditor)),
    ("PUT", "/1.0/sandboxes/{name}/policy", Some(Role::Operator)),
    ("POST", "/1.0/sandboxes/{name}/exec", Some(Role::User)),
    ("GET", "/1.0/sandboxes/{name}/logs", Some(Role::User)),
    ("GET", "/1.0/sandboxes/{name}/learn", Some(Role::User)),
    ("GET", "/1.0/networks", Some(Role::Auditor)),
    ("POST", "/1.0/networks", Some(Role::Operator)),
    ("GET", "/1.0/networks/{name}", Some(Role::Auditor)),
    ("DELETE", "/1.0/networks/{name}", Some(Role::Operator)),
    ("GET", "/1.0/events", Some(Role::Auditor)),
    ("GET", "/1.0/metrics", Some(Role::Auditor)),
    ("GET", "/1.0/certificates", Some(Role::Admin)),
    // Admins add certificates; anyone may redeem a join token (checked in the handler).
    ("POST", "/1.0/certificates", None),
    (
        "DELETE",
        "/1.0/certificates/{fingerprint}",
        Some(Role::Admin),
    ),
    ("POST", "/1.0/tokens", Some(Role::Admin)),
    ("GET", "/1.0/audit", Some(Role::Admin)),
    ("GET", "/1.0/config", Some(Role::Admin)),
];

/// An error as every endpoint returns it: `{"error": message, "code": status}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }
    pub fn bad_request(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, m)
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, m)
    }
    pub fn conflict(m: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, m)
    }
    pub fn forbidden(m: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, m)
    }
    pub fn internal(m: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, m)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!("{}", self.message);
        }
        (
            self.status,
            Json(json!({"error": self.message, "code": self.status.as_u16()})),
        )
            .into_response()
    }
}

/// A JSON body whose every rejection (wrong content type, syntax, unknown field, too
/// large) is an `ApiError` with the fitting 4xx status.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    Json<T>: FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(rej) => {
                let status = rej.status();
                let message = match &rej {
                    JsonRejection::MissingJsonContentType(_) => {
                        "expected a JSON body with Content-Type: application/json".to_owned()
                    }
                    JsonRejection::BytesRejection(_) if status == StatusCode::PAYLOAD_TOO_LARGE => {
                        "request body too large".to_owned()
                    }
                    _ => rej.body_text(),
                };
                Err(ApiError::new(status, message))
            }
        }
    }
}

type ApiResult<T> = Result<T, ApiError>;

pub fn router(d: Arc<Daemon>) -> Router {
    let limit = d.config.limits.max_body_bytes;
    let timeout = Duration::from_secs(d.config.limits.request_timeout_secs);
    // Requests that end: bounded in time. Streams (exec, events) are not.
    let bounded = Router::new()
        .route("/1.0", get(server_info))
        .route("/1.0/openapi.json", get(openapi))
        .route("/1.0/sandboxes", get(list_sandboxes).post(create_sandbox))
        .route(
            "/1.0/sandboxes/{name}",
            get(show_sandbox).delete(delete_sandbox),
        )
        .route(
            "/1.0/sandboxes/{name}/policy",
            put(set_policy).get(get_policy),
        )
        .route("/1.0/sandboxes/{name}/logs", get(sandbox_logs))
        .route("/1.0/sandboxes/{name}/learn", get(sandbox_learn))
        .route("/1.0/networks", get(list_networks).post(create_network))
        .route(
            "/1.0/networks/{name}",
            get(show_network).delete(delete_network),
        )
        .route("/1.0/metrics", get(super::metrics::metrics))
        .route(
            "/1.0/certificates",
            get(super::auth::list_certificates).post(super::auth::add_certificate),
        )
        .route(
            "/1.0/certificates/{fingerprint}",
            axum::routing::delete(super::auth::remove_certificate),
        )
        .route("/1.0/tokens", post(super::auth::issue_token))
        .route("/1.0/audit", get(audit_log))
        .route("/1.0/config", get(show_config))
        .layer(middleware::from_fn(
            move |req: Request, next: Next| async move {
                match tokio::time::timeout(timeout, next.run(req)).await {
                    Ok(r) => r,
                    Err(_) => ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("request not answered within {} s", timeout.as_secs()),
                    )
                    .into_response(),
                }
            },
        ));
    let streams = Router::new()
        .route("/1.0/events", get(events))
        .route("/1.0/sandboxes/{name}/exec", post(super::exec::exec));
    bounded
        .merge(streams)
        .fallback(|| async { ApiError::not_found("no such endpoint (see GET /1.0/openapi.json)") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this endpoint (see GET /1.0/openapi.json)",
            )
        })
        .layer(middleware::from_fn_with_state(d.clone(), authorize))
        .layer(axum::extract::DefaultBodyLimit::max(limit))
        .with_state(d)
}

/// The least role a route needs.
pub fn required_role(method: &Method, path: &str) -> Option<Option<Role>> {
    ROUTES
        .iter()
        .find(|(m, p, _)| *m == method.as_str() && *p == path)
        .map(|(_, _, r)| *r)
}

/// Checks the caller's role against the route's, and audits mutating calls.
async fn authorize(State(d): State<Arc<Daemon>>, mut req: Request, next: Next) -> Response {
    let caller = match req.extensions().get::<super::auth::Peer>() {
        Some(peer) => d.identify(peer),
        None => Caller::untrusted(),
    };
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let matched = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned());
    if let Some(m) = &matched
        && let Some(Some(needed)) = required_role(&method, m)
    {
        let allowed = caller.role.is_some_and(|r| r.allows(needed));
        if !allowed {
            let why = match caller.role {
                None => "this client certificate is not trusted (add it with `portcullis trust add`, or join with a token)".to_owned(),
                Some(r) => format!("role {r} may not {method} {m}: it needs {needed}"),
            };
            let resp = ApiError::forbidden(why).into_response();
            audit(&d, &caller, &method, &path, resp.status());
            return resp;
        }
    }
    req.extensions_mut().insert(caller.clone());
    let resp = next.run(req).await;
    audit(&d, &caller, &method, &path, resp.status());
    resp
}

fn audit(d: &Daemon, caller: &Caller, method: &Method, path: &str, status: StatusCode) {
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return;
    }
    let role = caller
        .role
        .map_or("untrusted".to_owned(), |r| r.to_string());
    if let Err(e) = d
        .store
        .audit(&caller.name, &role, method.as_str(), path, status.as_u16())
    {
        tracing::error!("audit log: {e:#}");
    }
}

async fn server_info(
    State(d): State<Arc<Daemon>>,
    axum::Extension(caller): axum::Extension<Caller>,
) -> Json<Value> {
    Json(json!({
        "api_version": "1.0",
        "server": "portcullis",
        "version": env!("CARGO_PKG_VERSION"),
        "auth": if caller.role.is_some() { "trusted" } else { "untrusted" },
        "identity": caller.name,
        "role": caller.role.map(|r| r.to_string()),
        "certificate_fingerprint": d.server_fingerprint(),
    }))
}

async fn openapi() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        OPENAPI,
    )
        .into_response()
}

async fn list_sandboxes(State(d): State<Arc<Daemon>>) -> Json<Value> {
    let views: Vec<_> = d
        .sandboxes
        .all()
        .iter()
        .map(|l| d.sandboxes.view(l))
        .collect();
    Json(json!(views))
}

async fn create_sandbox(
    State(d): State<Arc<Daemon>>,
    ApiJson(req): ApiJson<CreateRequest>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let view = d.sandboxes.create(req).await?;
    Ok((StatusCode::CREATED, Json(json!(view))))
}

fn live(d: &Daemon, name: &str) -> ApiResult<Arc<super::sandboxes::Live>> {
    super::sandboxes::valid_name(name)?;
    d.sandboxes
        .get(name)
        .ok_or_else(|| ApiError::not_found(format!("no sandbox named {name}")))
}

async fn show_sandbox(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    let l = live(&d, &name)?;
    Ok(Json(json!(d.sandboxes.view(&l))))
}

async fn delete_sandbox(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    live(&d, &name)?;
    d.sandboxes.delete(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn get_policy(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    let l = live(&d, &name)?;
    if l.learn.is_some() {
        // An empty policy would read as "nothing allowed"; its egress is open.
        return Err(ApiError::conflict(format!(
            "sandbox {name} learns: it has no policy, and its egress is open"
        )));
    }
    let row = l
        .row
        .lock()
        .map_err(|_| ApiError::internal("poisoned"))?
        .clone();
    Ok(Json(json!(row.policy)))
}

async fn set_policy(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
    ApiJson(source): ApiJson<PolicySource>,
) -> ApiResult<Json<Value>> {
    live(&d, &name)?;
    let change = d.sandboxes.set_policy(&name, source).await?;
    Ok(Json(json!(change)))
}

async fn sandbox_logs(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    let l = live(&d, &name)?;
    let view = d.sandboxes.view(&l);
    let flows = l
        .blocked
        .lock()
        .map_err(|_| ApiError::internal("poisoned"))?
        .clone();
    let report = crate::report::Report::build(
        &l.ctx.policy(),
        &l.ctx.report(),
        &flows,
        view.blocked_packets,
        0,
    );
    let mut v = json!(report);
    if let Value::Object(m) = &mut v {
        m.remove("exit_code");
        m.insert("sandbox".into(), json!(name));
        m.insert("allowed_names".into(), json!(l.ctx.report().allowed));
        m.insert(
            "unlisted_blocked_packets".into(),
            json!(
                l.blocked_unlisted
                    .load(std::sync::atomic::Ordering::Relaxed)
            ),
        );
    }
    Ok(Json(v))
}

/// A learning sandbox's log so far (JSON lines, as `learn --log` writes them), ended by an
/// `end` line for this moment: `portcullis policy suggest` makes the policy from it.
async fn sandbox_learn(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    let l = live(&d, &name)?;
    let log = l.learn.clone().ok_or_else(|| {
        ApiError::conflict(format!(
            "sandbox {name} does not learn (create one with \"learn\": true)"
        ))
    })?;
    let text = tokio::task::spawn_blocking(move || log.download())
        .await
        .map_err(|e| ApiError::internal(format!("learn log task: {e}")))?
        .map_err(|e| ApiError::internal(format!("{e:#}")))?;
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-ndjson"),
        )],
        text,
    )
        .into_response())
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NetworkRequest {
    name: String,
    #[serde(default)]
    subnet4: Option<ipnet::Ipv4Net>,
    #[serde(default)]
    subnet6: Option<ipnet::Ipv6Net>,
}

#[derive(Debug, Serialize)]
struct NetworkView {
    name: String,
    bridge: String,
    subnet4: ipnet::Ipv4Net,
    subnet6: ipnet::Ipv6Net,
    gateway4: std::net::Ipv4Addr,
    gateway6: std::net::Ipv6Addr,
    sandboxes: Vec<String>,
}

fn network_view(d: &Daemon, n: portcullis_kernel::state::NetworkRecord) -> NetworkView {
    let sandboxes = d
        .sandboxes
        .all()
        .iter()
        .filter(|l| {
            l.row
                .lock()
                .is_ok_and(|r| r.network.as_deref() == Some(n.name.as_str()))
        })
        .map(|l| l.name.clone())
        .collect();
    NetworkView {
        name: n.name.as_str().to_owned(),
        bridge: n.bridge,
        subnet4: n.subnet4,
        subnet6: n.subnet6,
        gateway4: n.gateway4,
        gateway6: n.gateway6,
        sandboxes,
    }
}

fn network_name(name: &str) -> ApiResult<portcullis_kernel::names::NetworkName> {
    portcullis_kernel::names::NetworkName::parse(name).ok_or_else(|| {
        ApiError::bad_request(format!(
            "invalid network name {name:?}: 1 to 32 of a-z, 0-9, '-' and '_'"
        ))
    })
}

async fn list_networks(State(d): State<Arc<Daemon>>) -> ApiResult<Json<Value>> {
    let nets = d
        .sandboxes
        .state
        .networks()
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let views: Vec<_> = nets.into_iter().map(|n| network_view(&d, n)).collect();
    Ok(Json(json!(views)))
}

async fn create_network(
    State(d): State<Arc<Daemon>>,
    ApiJson(req): ApiJson<NetworkRequest>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let name = network_name(&req.name)?;
    let d2 = d.clone();
    let rec = tokio::task::spawn_blocking(move || {
        crate::commands::network::create(
            &d2.sandboxes.state,
            &name,
            req.subnet4,
            req.subnet6,
            d2.config.pool4,
            d2.config.pool6,
        )
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
    .map_err(|e| {
        let m = format!("{e:#}");
        if m.ends_with("exists") {
            ApiError::conflict(m)
        } else if m.starts_with("--subnet") || m.contains("overlaps") {
            ApiError::bad_request(m.replace("--subnet", "subnet"))
        } else {
            ApiError::internal(m)
        }
    })?;
    d.store
        .put_network(
            rec.name.as_str(),
            &rec.subnet4.to_string(),
            &rec.subnet6.to_string(),
        )
        .map_err(|e| ApiError::internal(e.to_string()))?;
    d.sandboxes
        .events
        .lifecycle("", "network-created", json!({"network": rec.name.as_str()}));
    Ok((StatusCode::CREATED, Json(json!(network_view(&d, rec)))))
}

async fn show_network(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    let n = network_name(&name)?;
    let rec = d
        .sandboxes
        .state
        .network(&n)
        .map_err(|e| ApiError::internal(e.to_string()))?
        .ok_or_else(|| ApiError::not_found(format!("no network named {name}")))?;
    Ok(Json(json!(network_view(&d, rec))))
}

async fn delete_network(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    let n = network_name(&name)?;
    let d2 = d.clone();
    let n2 = n.clone();
    tokio::task::spawn_blocking(move || crate::commands::network::delete(&d2.sandboxes.state, &n2))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| {
            let m = e.to_string();
            if m.starts_with("no network named") {
                ApiError::not_found(m)
            } else if m.contains("in use") {
                ApiError::conflict(m)
            } else {
                ApiError::internal(m)
            }
        })?;
    d.store
        .delete_network(n.as_str())
        .map_err(|e| ApiError::internal(e.to_string()))?;
    d.sandboxes
        .events
        .lifecycle("", "network-deleted", json!({"network": n.as_str()}));
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    #[serde(default = "default_audit_limit")]
    limit: u32,
}
fn default_audit_limit() -> u32 {
    1000
}

async fn audit_log(
    State(d): State<Arc<Daemon>>,
    q: Result<axum::extract::Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Value>> {
    let q = q.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let v = d
        .store
        .audit_log(q.limit.min(100_000))
        .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(Json(json!(v)))
}

async fn show_config(State(d): State<Arc<Daemon>>) -> Json<Value> {
    Json(json!(d.config))
}

/// `GET /1.0/events`: one JSON object per line, as they happen.
async fn events(State(d): State<Arc<Daemon>>) -> Response {
    use tokio::sync::broadcast::error::RecvError;
    let rx = d.sandboxes.events.subscribe();
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        let line = match rx.recv().await {
            Ok(ev) => format!("{ev}\n"),
            Err(RecvError::Lagged(n)) => {
                format!(
                    "{}\n",
                    json!({"type": "lagged", "missed": n, "time": super::events::now_rfc3339()})
                )
            }
            Err(RecvError::Closed) => return None,
        };
        Some((Ok::<_, std::convert::Infallible>(line), rx))
    });
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-ndjson"),
        )],
        Body::from_stream(stream),
    )
        .into_response()
}
