//! The monitor (`/`) and client (`/client`) pages and their files (`/web/…`): the repository's
//! `web/` folder, embedded in the binary (debug builds read it from disk, so page edits need no
//! rebuild). The pages hold no data and are open without a token; everything they show comes from
//! the API routes, which ask for one. `GET /api/me` tells a page which role its token has, so it
//! shows only the actions that token may take.

use axum::Json;
use axum::extract::{Extension, Path};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use rust_embed::RustEmbed;

use crate::auth::{Caller, Role};
use crate::model::Me;

#[derive(RustEmbed)]
#[folder = "../../web"]
struct Assets;

/// `GET /`: the monitor page.
pub(crate) async fn monitor(headers: HeaderMap) -> Response {
    serve("index.html", &headers)
}

/// `GET /client`: the client page.
pub(crate) async fn client(headers: HeaderMap) -> Response {
    serve("client.html", &headers)
}

/// `GET /web/{*path}`: a file of the pages.
pub(crate) async fn file(Path(path): Path<String>, headers: HeaderMap) -> Response {
    serve(&path, &headers)
}

fn serve(path: &str, headers: &HeaderMap) -> Response {
    let Some(file) = Assets::get(path) else {
        return crate::error::ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no page file {path}"),
        )
        .into_response();
    };
    let etag: String = format!(
        "\"{}\"",
        file.metadata.sha256_hash().iter().take(16).map(|b| format!("{b:02x}")).collect::<String>()
    );
    let mut response =
        if headers.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()) == Some(etag.as_str()) {
            StatusCode::NOT_MODIFIED.into_response()
        } else {
            (StatusCode::OK, file.data.into_owned()).into_response()
        };
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(file.metadata.mimetype()) {
        h.insert(header::CONTENT_TYPE, v);
    }
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    // Revalidated every time (a 304 costs nothing): a new binary's pages are never mixed with
    // an old one's cached scripts.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    // Scripts and connections stay on this origin; images may also come from a service's own
    // `/view` links (ComfyUI outputs); progress bars set their width inline.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data: http: https:; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'",
        ),
    );
    response
}

/// `GET /api/me`: the caller's role and name, so a page offers only what the token may do.
#[utoipa::path(
    get,
    path = "/api/me",
    operation_id = "me",
    summary = "The caller's role and name",
    responses((status = 200, body = Me))
)]
pub(crate) async fn me(caller: Option<Extension<Caller>>) -> Json<Me> {
    Json(match caller {
        Some(Extension(c)) => Me { auth: true, role: c.role.as_str().to_owned(), name: Some(c.name) },
        None => Me { auth: false, role: Role::Admin.as_str().to_owned(), name: None },
    })
}
