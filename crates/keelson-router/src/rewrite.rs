//! A request head on its way to a variant: what is refused (`400`), what is rewritten for the
//! upstream's connection (target form, `Host`, cookies), and the hop-by-hop headers removed in both
//! directions. Pure header work: no I/O, no choice of variant, no response of its own.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Uri, Version};

use super::config::Upstream;

/// The header that marks a mirror copy, so that a model server can tell shadow traffic apart.
pub const MIRROR_HEADER: &str = "x-keelson-mirror";

/// What no variant should see, refused as nginx does with a `400` and this reason: a second
/// `Host`, an HTTP/1.1 request without one, `CONNECT` (the router tunnels nothing), and the sticky
/// header more than once (which value would choose?). Duplicates are looked for only when the
/// request has some name twice.
pub(crate) fn check_request<B>(
    req: &Request<B>,
    sticky: Option<&HeaderName>,
) -> Option<&'static str> {
    let h = req.headers();
    if req.method() == http::Method::CONNECT {
        return Some("keelson router: CONNECT is not supported\n");
    }
    if req.version() == Version::HTTP_11 && !h.contains_key(header::HOST) {
        return Some("keelson router: an HTTP/1.1 request needs a Host header\n");
    }
    if h.len() != h.keys_len() {
        let twice = |name: &HeaderName| h.get_all(name).iter().nth(1).is_some();
        if twice(&header::HOST) {
            return Some("keelson router: more than one Host header\n");
        }
        if sticky.is_some_and(twice) {
            return Some("keelson router: the sticky header more than once\n");
        }
    }
    None
}

/// Joins an HTTP/2 request's `cookie` fields into one, as RFC 9113 §8.2.3 asks before a request
/// goes on over HTTP/1.1.
pub(crate) fn join_cookies(h: &mut HeaderMap) {
    let mut all = h.get_all(header::COOKIE).iter();
    let Some(first) = all.next() else {
        return;
    };
    let mut joined = first.as_bytes().to_vec();
    let mut more = false;
    for c in all {
        joined.extend_from_slice(b"; ");
        joined.extend_from_slice(c.as_bytes());
        more = true;
    }
    if more {
        if let Ok(v) = HeaderValue::from_bytes(&joined) {
            h.insert(header::COOKIE, v);
        }
    }
}

/// Readies a request for an HTTP/2 upstream: the target in absolute form (HTTP/2 sends its
/// scheme and authority as `:scheme` and `:authority`), the authority being the client's (its
/// `:authority`, absolute-form target or `Host`), else the variant's; `Host` itself is left out.
pub(crate) fn to_h2_upstream<B>(up: &Upstream, req: &mut Request<B>) {
    let host = req.headers_mut().remove(header::HOST);
    let authority = req
        .uri()
        .authority()
        .cloned()
        .or_else(|| host.and_then(|h| http::uri::Authority::try_from(h.as_bytes()).ok()))
        .unwrap_or_else(|| up.authority.clone());
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(http::uri::Scheme::HTTP);
    parts.authority = Some(authority);
    parts.path_and_query = Some(
        req.uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    );
    if let Ok(uri) = Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
    *req.version_mut() = Version::HTTP_2;
}

/// Readies a request's target for the variant's connection: the URI in origin form (its path and
/// query), and the `Host`: the target's authority when it has one (HTTP/2's `:authority`, or an
/// absolute-form target, which RFC 9112 §3.2.2 puts before any `Host` header), else the client's
/// `Host`, else (HTTP/1.0) the variant's.
pub(crate) fn to_upstream<B>(up: &Upstream, req: &mut Request<B>) {
    if let Some(a) = req.uri().authority() {
        if let Ok(v) = HeaderValue::from_str(a.as_str()) {
            req.headers_mut().insert(header::HOST, v);
        }
    } else if !req.headers().contains_key(header::HOST) {
        if let Ok(v) = HeaderValue::from_str(up.authority.as_str()) {
            req.headers_mut().insert(header::HOST, v);
        }
    }
    let uri = req.uri();
    if uri.scheme().is_some() || uri.authority().is_some() {
        let origin = Uri::from(
            uri.path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
        );
        *req.uri_mut() = origin;
    }
}

/// Removes the headers that belong to one connection (RFC 9110 §7.6.1), including those that
/// `Connection` names.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Most messages carry none, or only `Connection: keep-alive`: one scan of the few names present
    // counts them, and only what is there is removed.
    let (mut found, mut connection) = (0, false);
    for name in h.keys() {
        if is_hop_by_hop(name) {
            found += 1;
            connection |= name == header::CONNECTION;
        }
    }
    if found == 0 {
        return;
    }
    if connection {
        found -= 1;
        // Headers that `Connection` names. `keep-alive` and `close` are the usual values: the first
        // goes with the standard names below, the second names no header.
        let mut named: Vec<HeaderName> = Vec::new();
        for c in h.get_all(header::CONNECTION) {
            let v = c.as_bytes();
            if v.eq_ignore_ascii_case(b"keep-alive") || v.eq_ignore_ascii_case(b"close") {
                continue;
            }
            // Token by token on the bytes: a value that is not ASCII still names its headers.
            named.extend(
                v.split(|&b| b == b',')
                    .map(<[u8]>::trim_ascii)
                    .filter(|n| {
                        !n.is_empty()
                            && !n.eq_ignore_ascii_case(b"keep-alive")
                            && !n.eq_ignore_ascii_case(b"close")
                    })
                    .filter_map(|n| HeaderName::from_bytes(n).ok())
                    // `Host` is end to end: a client must not make the router send its own.
                    .filter(|n| n != header::HOST),
            );
        }
        h.remove(header::CONNECTION);
        for name in named {
            h.remove(name);
        }
    }
    if found == 0 {
        return;
    }
    let rest: Vec<HeaderName> = h.keys().filter(|n| is_hop_by_hop(n)).cloned().collect();
    for name in rest {
        h.remove(name);
    }
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    // Runs over every header of every message: the standard names compare as enum values, the two
    // others only when the length matches.
    if name == header::CONNECTION
        || name == header::TE
        || name == header::TRAILER
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name == header::PROXY_AUTHORIZATION
    {
        return true;
    }
    let s = name.as_str();
    match s.len() {
        10 => s == "keep-alive",
        16 => s == "proxy-connection" || s == MIRROR_HEADER,
        _ => false,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
#[path = "rewrite_tests.rs"]
mod tests;
