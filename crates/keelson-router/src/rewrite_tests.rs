//! Tests of [`super`]: hop-by-hop removal, the upstream target, and what a client must not control.

use super::*;
use crate::config::RouterProtocol;
use crate::split::sticky_hash;

#[test]
fn hop_by_hop_headers_are_removed() {
    let mut h = HeaderMap::new();
    for (k, v) in [
        ("connection", "keep-alive, x-private"),
        ("keep-alive", "timeout=5"),
        ("x-private", "1"),
        ("transfer-encoding", "chunked"),
        ("te", "trailers"),
        ("upgrade", "h2c"),
        ("x-user-id", "42"),
        ("content-length", "3"),
    ] {
        h.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
    }
    strip_hop_by_hop(&mut h);
    let mut left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
    left.sort();
    assert_eq!(left, ["content-length", "x-user-id"]);
    // Several `Connection` values, in any case; `close` names nothing.
    let mut h = HeaderMap::new();
    h.append(header::CONNECTION, HeaderValue::from_static("Keep-Alive"));
    h.append(header::CONNECTION, HeaderValue::from_static("close, X-A"));
    h.insert("x-a", HeaderValue::from_static("1"));
    h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
    h.insert("x-b", HeaderValue::from_static("1"));
    strip_hop_by_hop(&mut h);
    assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-b"]);
    // A header that `Connection` names is removed even when nothing else is hop-by-hop.
    let mut h = HeaderMap::new();
    h.insert(header::CONNECTION, HeaderValue::from_static("x-a"));
    h.insert("x-a", HeaderValue::from_static("1"));
    h.insert("x-b", HeaderValue::from_static("1"));
    strip_hop_by_hop(&mut h);
    assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-b"]);
}

#[test]
fn the_upstream_target_is_origin_form_with_a_host() {
    let up = Upstream {
        name: "a".into(),
        weight: 1,
        authority: "10.0.0.1:8080".parse().unwrap(),
        protocol: RouterProtocol::Http1,
        metrics: crate::metrics::Metrics::default().variant("a"),
        pool: Default::default(),
        h2: Default::default(),
    };
    let target = |uri: &str, host: Option<&str>| {
        let mut req = Request::new(());
        *req.uri_mut() = uri.parse().unwrap();
        if let Some(host) = host {
            let v = HeaderValue::from_str(host).unwrap();
            req.headers_mut().insert(header::HOST, v);
        }
        to_upstream(&up, &mut req);
        (
            req.uri().to_string(),
            req.headers()[header::HOST].to_str().unwrap().to_string(),
        )
    };
    // HTTP/1.1: origin form and the client's Host, both kept.
    assert_eq!(
        target("/v1/models/fraud:predict?x=1", Some("fraud.example")),
        (
            "/v1/models/fraud:predict?x=1".into(),
            "fraud.example".into()
        )
    );
    // HTTP/2 (or absolute form): the authority becomes the Host.
    assert_eq!(
        target("http://public.example/p?q", None),
        ("/p?q".into(), "public.example".into())
    );
    // An absolute-form target's authority wins over Host (RFC 9112 §3.2.2).
    assert_eq!(
        target("http://public.example/p", Some("other")),
        ("/p".into(), "public.example".into())
    );
    // No authority anywhere: the variant's.
    assert_eq!(target("/p", None), ("/p".into(), "10.0.0.1:8080".into()));
}

#[test]
fn what_a_client_must_not_control_is_removed_or_refused() {
    // A non-ASCII Connection value still names its headers; Host cannot be named away; a
    // client's mirror mark goes.
    let mut h = HeaderMap::new();
    h.insert(
        header::CONNECTION,
        HeaderValue::from_bytes(b"x-secret, caf\xe9, host").unwrap(),
    );
    h.insert("x-secret", HeaderValue::from_static("s"));
    h.insert(header::HOST, HeaderValue::from_static("public.example"));
    h.insert(MIRROR_HEADER, HeaderValue::from_static("1"));
    strip_hop_by_hop(&mut h);
    assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["host"]);
    // Requests refused with a 400.
    let req = |raw: &[(&str, &str)], version| {
        let mut r = Request::get("/").version(version);
        for (k, v) in raw {
            r = r.header(*k, *v);
        }
        r.body(()).unwrap()
    };
    let sticky = HeaderName::from_static("x-user");
    let check = |r: &Request<()>| check_request(r, Some(&sticky));
    assert!(check(&req(&[("host", "a")], Version::HTTP_11)).is_none());
    assert!(check(&req(&[("host", "a"), ("host", "b")], Version::HTTP_11)).is_some());
    assert!(check(&req(&[], Version::HTTP_11)).is_some());
    assert!(check(&req(&[], Version::HTTP_10)).is_none());
    assert!(check(&req(&[("x-user", "1"), ("x-user", "2")], Version::HTTP_2)).is_some());
    assert!(check(&req(&[("x-other", "1"), ("x-other", "2")], Version::HTTP_2)).is_none());
    let connect = Request::connect("internal:22")
        .header("host", "internal:22")
        .body(())
        .unwrap();
    assert!(check(&connect).is_some());
    // HTTP/2 cookies become one field.
    let mut h = HeaderMap::new();
    h.append(header::COOKIE, HeaderValue::from_static("a=1"));
    h.append(header::COOKIE, HeaderValue::from_static("b=2"));
    join_cookies(&mut h);
    assert_eq!(
        h.get_all(header::COOKIE).iter().collect::<Vec<_>>(),
        ["a=1; b=2"]
    );
    // The sticky hash depends on its key.
    assert_ne!(sticky_hash((1, 2), b"u1"), sticky_hash((1, 3), b"u1"));
    assert_eq!(sticky_hash((1, 2), b"u1"), sticky_hash((1, 2), b"u1"));
}
