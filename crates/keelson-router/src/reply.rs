//! The router's own responses: the response body type, short plain-text answers, and gRPC
//! statuses for gRPC calls. It builds responses only; when to send one is the request path's call.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

use super::pool::UpstreamBody;
use super::upstream::UpstreamError;

/// A response body: the upstream's, streamed (from an HTTP/1.1 or an HTTP/2 upstream), or one made
/// by the router.
pub type Body = Either<Either<UpstreamBody, Incoming>, Full<Bytes>>;

/// The response to a client's own mistake with its request body: `400`, or `408` when it stalled.
pub(crate) fn client_error(e: &UpstreamError) -> Response<Body> {
    match e {
        UpstreamError::RequestBodyTimeout(_) => text(
            StatusCode::REQUEST_TIMEOUT,
            "keelson router: the request body did not arrive in time\n",
        ),
        _ => text(
            StatusCode::BAD_REQUEST,
            "keelson router: could not read the request body\n",
        ),
    }
}

/// The header of a gRPC call's deadline.
pub(crate) const GRPC_TIMEOUT: &str = "grpc-timeout";
/// gRPC status codes of the router's own answers.
pub(crate) const GRPC_DEADLINE_EXCEEDED: u8 = 4;
pub(crate) const GRPC_UNAVAILABLE: u8 = 14;

/// Whether a request is a gRPC call: its `content-type` is `application/grpc` or
/// `application/grpc+<codec>`.
pub(crate) fn is_grpc(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE).is_some_and(|v| {
        let v = v.as_bytes();
        v.len() >= 16
            && v[..16].eq_ignore_ascii_case(b"application/grpc")
            && matches!(v.get(16), None | Some(b'+' | b';'))
    })
}

/// A gRPC error made by the router: a trailers-only response (`200`, with `grpc-status` and
/// `grpc-message` in its only header block), as gRPC servers send it.
pub(crate) fn grpc_error(code: u8, message: &'static str) -> Response<Body> {
    let mut r = Response::new(Either::Right(Full::new(Bytes::new())));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert("grpc-status", HeaderValue::from(u16::from(code)));
    // Percent-encoding leaves these messages (printable ASCII without `%`) as they are.
    h.insert("grpc-message", HeaderValue::from_static(message));
    r
}

/// A short plain-text response made by the router.
pub fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(Either::Right(Full::new(Bytes::from_static(
        body.as_bytes(),
    ))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}
