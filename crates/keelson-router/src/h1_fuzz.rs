//! Property-based fuzzing of the upstream codec: the request encoder and the response decoder,
//! with arbitrary bytes and arbitrary splits of the input. The properties: nothing panics; the
//! outcome does not depend on how the bytes were split; a response whose framing is ambiguous is
//! never accepted; and every valid framing round-trips.
//!
//! `make test` runs proptest's default number of cases; `make fuzz` sets `PROPTEST_CASES` (read by
//! proptest's default config) much higher.

use super::*;
use proptest::prelude::*;

/// How reading a whole response ended.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// The head and body were accepted: the status, the forwarded headers, the body, whether the
    /// body ended by its framing (`false`: by the end of the input, for a body read to the close),
    /// and the bytes after it.
    Read {
        status: u16,
        headers: Vec<(String, Vec<u8>)>,
        body: Vec<u8>,
        framed: bool,
        rest: Vec<u8>,
    },
    /// The input ended before the response did.
    Incomplete,
    /// Refused.
    Refused,
}

/// Reads one response from `raw`, fed in pieces cut at `cuts` (offsets, any order), the way the
/// pool does: the head first, then the body from what follows; the end of `raw` is the upstream
/// closing the connection.
fn read(raw: &[u8], cuts: &[usize], head_request: bool) -> Outcome {
    let mut at: Vec<usize> = cuts.iter().map(|&c| c % (raw.len() + 1)).collect();
    at.push(raw.len());
    at.sort_unstable();
    let mut buf = BytesMut::new();
    let mut from = 0;
    let mut head: Option<ResponseHead> = None;
    let mut body = Vec::new();
    for to in at {
        buf.extend_from_slice(&raw[from..to]);
        from = to;
        if head.is_none() {
            match parse_response(&mut buf, head_request) {
                Ok(Some(h)) => head = Some(h),
                Ok(None) => continue,
                Err(_) => return Outcome::Refused,
            }
        }
        let Some(h) = head.as_mut() else { continue };
        loop {
            match h.body.decode(&mut buf) {
                Ok(Decoded::Data(d)) => {
                    assert!(!d.is_empty(), "an empty data piece");
                    body.extend_from_slice(&d);
                }
                Ok(Decoded::More) => break,
                Ok(Decoded::End) => {
                    // What follows the body is the connection's, not the body's.
                    buf.extend_from_slice(&raw[from..]);
                    return read_outcome(h, body, true, buf.to_vec());
                }
                Err(_) => return Outcome::Refused,
            }
        }
    }
    match head {
        Some(h) if h.body == Decoder::Close => read_outcome(&h, body, false, Vec::new()),
        _ => Outcome::Incomplete,
    }
}

fn read_outcome(h: &ResponseHead, body: Vec<u8>, framed: bool, rest: Vec<u8>) -> Outcome {
    Outcome::Read {
        status: h.status.as_u16(),
        headers: h
            .headers
            .iter()
            .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
            .collect(),
        body,
        framed,
        rest,
    }
}

/// How a response head frames its body, judged from its raw header lines alone (the test's own
/// reading of RFC 9112 §6 with nginx's strictness): `None` when it is ambiguous or unsupported.
#[derive(Debug, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked,
    Close,
}

fn framing_of(lines: &[(String, String)]) -> Option<Framing> {
    let mut lengths = Vec::new();
    let mut codings = Vec::new();
    for (name, value) in lines {
        if name.eq_ignore_ascii_case("content-length") {
            let v = value.trim();
            if v.is_empty() || v.len() > 19 || !v.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            lengths.push(v.parse::<u64>().ok()?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            codings.push(value.trim().to_ascii_lowercase());
        }
    }
    if lengths.windows(2).any(|w| w[0] != w[1]) {
        return None;
    }
    match (codings.as_slice(), lengths.first()) {
        ([], None) => Some(Framing::Close),
        ([], Some(&n)) => Some(Framing::Length(n)),
        ([c], None) if c == "chunked" => Some(Framing::Chunked),
        _ => None,
    }
}

/// Framing header lines: lengths (valid, invalid, repeated, conflicting) and codings.
fn framing_lines() -> impl Strategy<Value = Vec<(String, String)>> {
    let name = prop_oneof![
        Just("Content-Length"),
        Just("content-length"),
        Just("Transfer-Encoding"),
        Just("transfer-encoding"),
    ];
    let value = prop_oneof![
        Just("0".to_owned()),
        Just("5".to_owned()),
        Just("6".to_owned()),
        Just(" 5 ".to_owned()),
        Just("-1".to_owned()),
        Just("5, 5".to_owned()),
        Just("+5".to_owned()),
        Just("0x5".to_owned()),
        Just("99999999999999999999".to_owned()),
        Just("chunked".to_owned()),
        Just("Chunked".to_owned()),
        Just("gzip".to_owned()),
        Just("gzip, chunked".to_owned()),
        Just("chunked, gzip".to_owned()),
        Just("chunked, chunked".to_owned()),
        Just("identity".to_owned()),
        Just("".to_owned()),
    ];
    prop::collection::vec((name.prop_map(str::to_owned), value), 0..4)
}

/// A valid body and its framing: a length, chunks (with extensions and trailers), or until the
/// close.
#[derive(Debug, Clone)]
enum Body {
    Length(Vec<u8>),
    Chunked(Vec<Vec<u8>>, bool, bool),
    Close(Vec<u8>),
}

fn body() -> impl Strategy<Value = Body> {
    let bytes = prop::collection::vec(any::<u8>(), 0..300);
    prop_oneof![
        bytes.clone().prop_map(Body::Length),
        (
            prop::collection::vec(prop::collection::vec(any::<u8>(), 1..80), 0..6),
            any::<bool>(),
            any::<bool>()
        )
            .prop_map(|(c, ext, trailers)| Body::Chunked(c, ext, trailers)),
        bytes.prop_map(Body::Close),
    ]
}

impl Body {
    /// The head's framing line and the body's bytes on the wire.
    fn wire(&self) -> (&'static str, String, Vec<u8>) {
        match self {
            Body::Length(b) => ("content-length", b.len().to_string(), b.clone()),
            Body::Chunked(chunks, ext, trailers) => {
                let mut w = Vec::new();
                for c in chunks {
                    w.extend_from_slice(format!("{:X}", c.len()).as_bytes());
                    if *ext {
                        w.extend_from_slice(b";name=\"v\"");
                    }
                    w.extend_from_slice(b"\r\n");
                    w.extend_from_slice(c);
                    w.extend_from_slice(b"\r\n");
                }
                w.extend_from_slice(b"0\r\n");
                if *trailers {
                    w.extend_from_slice(b"x-checksum: 1\r\n");
                }
                w.extend_from_slice(b"\r\n");
                ("transfer-encoding", "chunked".into(), w)
            }
            Body::Close(b) => ("x-framing", "close".into(), b.clone()),
        }
    }

    fn bytes(&self) -> Vec<u8> {
        match self {
            Body::Length(b) | Body::Close(b) => b.clone(),
            Body::Chunked(c, ..) => c.concat(),
        }
    }
}

fn cuts() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(any::<usize>(), 0..8)
}

/// A header value: visible ASCII and spaces, not starting or ending with a space.
fn value() -> impl Strategy<Value = String> {
    "[!-~]([ -~]{0,20}[!-~])?"
}

proptest! {
    /// Arbitrary bytes, after a valid status line or not, in arbitrary pieces: no panic, and the
    /// same outcome as all at once.
    #[test]
    fn arbitrary_responses_never_panic_and_do_not_depend_on_splits(
        prefix in prop_oneof![Just(&b""[..]), Just(&b"HTTP/1.1 200 OK\r\n"[..]), Just(&b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"[..])],
        tail in prop::collection::vec(any::<u8>(), 0..400),
        head_request in any::<bool>(),
        cuts in cuts(),
    ) {
        let raw = [prefix, &tail].concat();
        let whole = read(&raw, &[], head_request);
        prop_assert_eq!(read(&raw, &cuts, head_request), whole);
    }

    /// Chunked bodies built from arbitrary pieces of chunk syntax: no panic, split-independent.
    #[test]
    fn arbitrary_chunk_syntax_never_panics(
        pieces in prop::collection::vec(prop_oneof![
            Just(b"\r\n".to_vec()), Just(b"\n".to_vec()), Just(b"\r".to_vec()), Just(b"0".to_vec()),
            Just(b"5".to_vec()), Just(b"fffffffffffffffff".to_vec()), Just(b";e=1".to_vec()),
            Just(b"hello".to_vec()), Just(b"x: y".to_vec()), Just(b" ".to_vec()),
            prop::collection::vec(any::<u8>(), 0..4),
        ], 0..20),
        cuts in cuts(),
    ) {
        let raw = [&b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"[..], &pieces.concat()].concat();
        let whole = read(&raw, &[], false);
        if let Outcome::Read { framed, .. } = &whole {
            prop_assert!(*framed, "a chunked body ended by the close");
        }
        prop_assert_eq!(read(&raw, &cuts, false), whole);
    }

    /// Any mix of Content-Length and Transfer-Encoding lines: accepted exactly when the framing is
    /// unambiguous, and then read by that framing with one Content-Length at most passed on.
    #[test]
    fn ambiguous_framing_is_never_accepted(
        lines in framing_lines(),
        others in prop::collection::vec(("x-[a-z]{1,8}", value()), 0..3),
        cuts in cuts(),
    ) {
        let mut raw = b"HTTP/1.1 200 OK\r\n".to_vec();
        for (n, v) in lines.iter().chain(&others) {
            raw.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
        }
        raw.extend_from_slice(b"\r\n");
        // Enough body for any of the lengths, as chunks too: "5\r\nhello\r\n0\r\n\r\n" is 15 bytes.
        raw.extend_from_slice(b"5\r\nhello\r\n0\r\n\r\n");
        let got = read(&raw, &cuts, false);
        match (framing_of(&lines), &got) {
            (None, Outcome::Refused) => {}
            (None, other) => prop_assert!(false, "ambiguous framing accepted: {lines:?} -> {other:?}"),
            (Some(Framing::Length(n)), Outcome::Read { body, headers, framed, .. }) => {
                prop_assert!(*framed);
                prop_assert_eq!(body.len() as u64, n);
                let lengths: Vec<_> = headers.iter().filter(|(n, _)| n == "content-length").collect();
                prop_assert_eq!(lengths.len(), 1);
                prop_assert!(!headers.iter().any(|(n, _)| n == "transfer-encoding"));
            }
            (Some(Framing::Length(n)), Outcome::Incomplete) => prop_assert!(n > 15),
            (Some(Framing::Chunked), Outcome::Read { body, headers, framed, rest, .. }) => {
                prop_assert!(*framed);
                prop_assert_eq!(&body[..], b"hello");
                prop_assert!(rest.is_empty());
                prop_assert!(!headers.iter().any(|(n, _)| n == "content-length"));
            }
            (Some(Framing::Close), Outcome::Read { body, framed, .. }) => {
                prop_assert!(!*framed);
                prop_assert_eq!(&body[..], b"5\r\nhello\r\n0\r\n\r\n");
            }
            (framing, other) => prop_assert!(false, "{lines:?}: {framing:?} read as {other:?}"),
        }
    }

    /// Every valid framing round-trips in any pieces: the body comes back whole, the bytes after
    /// a framed body stay on the connection, and interim responses before it are skipped.
    #[test]
    fn valid_responses_round_trip(
        status in prop_oneof![Just(200u16), Just(201), Just(404), Just(500), Just(503)],
        interim in any::<bool>(),
        others in prop::collection::vec(("x-[a-z]{1,8}", value()), 0..4),
        body in body(),
        after in prop::collection::vec(any::<u8>(), 0..40),
        cuts in cuts(),
    ) {
        let (name, framing, wire) = body.wire();
        let mut raw = Vec::new();
        if interim {
            raw.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
        }
        raw.extend_from_slice(format!("HTTP/1.1 {status} S\r\n{name}: {framing}\r\n").as_bytes());
        for (n, v) in &others {
            raw.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
        }
        raw.extend_from_slice(b"\r\n");
        raw.extend_from_slice(&wire);
        let closed = matches!(body, Body::Close(_));
        if !closed {
            raw.extend_from_slice(&after);
        }
        let Outcome::Read { status: got, headers, body: got_body, framed, rest } = read(&raw, &cuts, false) else {
            return Err(TestCaseError::fail(format!("refused or incomplete: {:?}", String::from_utf8_lossy(&raw))));
        };
        prop_assert_eq!(got, status);
        prop_assert_eq!(got_body, body.bytes());
        prop_assert_eq!(framed, !closed);
        prop_assert_eq!(rest, if closed { Vec::new() } else { after });
        for (n, v) in &others {
            prop_assert!(headers.iter().any(|(hn, hv)| hn == n && hv == v.as_bytes()));
        }
    }

    /// The request encoder: any method, target, headers (a client's framing headers among them) and
    /// body; the head parses back with httparse to the same request with exactly one framing
    /// header, and the body decodes back to the same bytes.
    #[test]
    fn requests_round_trip_with_one_framing(
        method in prop_oneof![Just(Method::GET), Just(Method::POST), Just(Method::PUT), Just(Method::DELETE), Just(Method::PATCH)],
        path in "/[a-zA-Z0-9/._~%-]{0,30}(\\?[a-z0-9=&]{0,20})?",
        headers in prop::collection::vec(("x-[a-z]{1,8}", value()), 0..5),
        client_framing in framing_lines(),
        pieces in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..50), 0..5),
        length_known in any::<bool>(),
        cuts in cuts(),
    ) {
        let mut req = Request::builder().method(method.clone()).uri(&path);
        for (n, v) in headers.iter().chain(&client_framing) {
            if let Ok(v) = HeaderValue::from_str(v) {
                req = req.header(n.as_str(), v);
            }
        }
        let req = req.body(()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let body: Vec<u8> = pieces.concat();
        let empty = body.is_empty() && (length_known || pieces.is_empty());
        let exact = length_known.then_some(body.len() as u64);
        let mut out = Vec::new();
        let framing = encode_request(&req, empty, exact, &mut out);
        let head_len = out.len();
        for p in &pieces {
            match framing {
                RequestFraming::Chunked => encode_chunk(p, &mut out),
                _ => out.extend_from_slice(p),
            }
        }
        if framing == RequestFraming::Chunked {
            out.extend_from_slice(LAST_CHUNK);
        }
        let mut fields = [httparse::EMPTY_HEADER; 32];
        let mut parsed = httparse::Request::new(&mut fields);
        let n = match parsed.parse(&out[..head_len]) {
            Ok(httparse::Status::Complete(n)) => n,
            other => return Err(TestCaseError::fail(format!("{other:?}: {:?}", String::from_utf8_lossy(&out)))),
        };
        prop_assert_eq!(n, head_len);
        prop_assert_eq!(parsed.method, Some(method.as_str()));
        prop_assert_eq!(parsed.path, Some(path.as_str()));
        let framing_lines: Vec<(String, String)> = parsed.headers.iter()
            .filter(|h| h.name.eq_ignore_ascii_case("content-length") || h.name.eq_ignore_ascii_case("transfer-encoding"))
            .map(|h| (h.name.to_owned(), String::from_utf8_lossy(h.value).into_owned()))
            .collect();
        let others: Vec<(String, Vec<u8>)> = parsed.headers.iter()
            .filter(|h| !h.name.eq_ignore_ascii_case("content-length") && !h.name.eq_ignore_ascii_case("transfer-encoding"))
            .map(|h| (h.name.to_owned(), h.value.to_vec()))
            .collect();
        let expected: Vec<(String, Vec<u8>)> = headers.iter()
            .filter(|(_, v)| HeaderValue::from_str(v).is_ok())
            .map(|(n, v)| (n.clone(), v.as_bytes().to_vec()))
            .collect();
        let mut sorted = others.clone();
        sorted.sort();
        let mut expected_sorted = expected;
        expected_sorted.sort();
        prop_assert_eq!(sorted, expected_sorted);
        prop_assert!(framing_lines.len() <= 1, "{framing_lines:?}");
        // Decoded as a response body would be: the framing says where the body ends.
        let decoder = match (framing, framing_of(&framing_lines)) {
            (RequestFraming::Empty, Some(Framing::Close)) => None,
            (RequestFraming::Empty, Some(Framing::Length(0))) => None,
            (RequestFraming::Length, Some(Framing::Length(n))) => Some(Decoder::Length(n)),
            (RequestFraming::Chunked, Some(Framing::Chunked)) => Some(Decoder::Chunked(Chunk::Size)),
            (f, l) => return Err(TestCaseError::fail(format!("{f:?} written as {l:?}"))),
        };
        let wire = &out[head_len..];
        match decoder {
            None => {
                prop_assert!(body.is_empty());
                prop_assert!(wire.is_empty());
            }
            Some(d) => {
                let mut buf = BytesMut::new();
                let mut got = Vec::new();
                let mut decoder = d;
                let mut at: Vec<usize> = cuts.iter().map(|&c| c % (wire.len() + 1)).collect();
                at.push(wire.len());
                at.sort_unstable();
                let mut from = 0;
                let mut ended = false;
                'feed: for to in at {
                    buf.extend_from_slice(&wire[from..to]);
                    from = to;
                    loop {
                        match decoder.decode(&mut buf) {
                            Ok(Decoded::Data(d)) => got.extend_from_slice(&d),
                            Ok(Decoded::More) => break,
                            Ok(Decoded::End) => { ended = true; break 'feed; }
                            Err(e) => return Err(TestCaseError::fail(e.to_string())),
                        }
                    }
                }
                prop_assert!(ended || decoder.is_done());
                prop_assert_eq!(got, body);
                prop_assert!(buf.is_empty() && from == wire.len());
            }
        }
    }
}
