//! Tests of the HTTP/1.1 codec: request heads, response heads and body framing.

use super::*;

fn parse(
    raw: &[u8],
    head_request: bool,
) -> (Result<Option<ResponseHead>, ProtocolError>, BytesMut) {
    let mut buf = BytesMut::from(raw);
    let r = parse_response(&mut buf, head_request);
    (r, buf)
}

/// Decodes everything in `raw` (fed in pieces of `step` bytes) into the body's bytes.
fn decode_all(mut d: Decoder, raw: &[u8], step: usize) -> Result<(Vec<u8>, bool), ProtocolError> {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for piece in raw.chunks(step.max(1)) {
        buf.extend_from_slice(piece);
        loop {
            match d.decode(&mut buf)? {
                Decoded::Data(b) => out.extend_from_slice(&b),
                Decoded::More => break,
                Decoded::End => return Ok((out, buf.is_empty())),
            }
        }
    }
    Ok((out, false))
}

#[test]
fn a_request_head_is_origin_form_with_its_framing() {
    let req = Request::get("http://x/a/b?c=1")
        .header("host", "x")
        .header("x-user", "7")
        .body(())
        .unwrap();
    let mut out = Vec::new();
    assert_eq!(
        encode_request(&req, true, Some(0), &mut out),
        RequestFraming::Empty
    );
    assert_eq!(
        out,
        b"GET /a/b?c=1 HTTP/1.1\r\nhost: x\r\nx-user: 7\r\n\r\n"
    );

    let req = Request::post("/p").body(()).unwrap();
    out.clear();
    assert_eq!(
        encode_request(&req, true, Some(0), &mut out),
        RequestFraming::Empty
    );
    assert_eq!(out, b"POST /p HTTP/1.1\r\ncontent-length: 0\r\n\r\n");

    let req = Request::post("/p")
        .header("content-length", "5")
        .body(())
        .unwrap();
    out.clear();
    assert_eq!(
        encode_request(&req, false, Some(5), &mut out),
        RequestFraming::Length
    );
    assert_eq!(out, b"POST /p HTTP/1.1\r\ncontent-length: 5\r\n\r\n");

    // An HTTP/2 request has no Content-Length header; its length may still be known.
    out.clear();
    let req = Request::put("/p").body(()).unwrap();
    assert_eq!(
        encode_request(&req, false, Some(12), &mut out),
        RequestFraming::Length
    );
    assert_eq!(out, b"PUT /p HTTP/1.1\r\ncontent-length: 12\r\n\r\n");

    out.clear();
    assert_eq!(
        encode_request(&req, false, None, &mut out),
        RequestFraming::Chunked
    );
    assert_eq!(
        out,
        b"PUT /p HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n"
    );

    out.clear();
    encode_chunk(b"hello world", &mut out);
    encode_chunk(b"", &mut out);
    out.extend_from_slice(LAST_CHUNK);
    assert_eq!(out, b"b\r\nhello world\r\n0\r\n\r\n");
}

#[test]
fn a_response_head_is_parsed_and_leaves_the_body() {
    let raw =
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Model: fraud\r\nx-model: v2\r\n\r\nhelloHTTP";
    let (r, buf) = parse(raw, false);
    let h = r.unwrap().unwrap();
    assert_eq!(h.status, StatusCode::OK);
    assert_eq!(h.headers["content-length"], "5");
    let models: Vec<_> = h.headers.get_all("x-model").iter().collect();
    assert_eq!(models, ["fraud", "v2"]);
    assert_eq!(h.body, Decoder::Length(5));
    assert!(h.keep_alive);
    assert_eq!(&buf[..], b"helloHTTP");

    // Not complete yet: nothing is taken.
    let (r, buf) = parse(b"HTTP/1.1 200 OK\r\nContent-Le", false);
    assert!(r.unwrap().is_none());
    assert_eq!(buf.len(), 27);
}

#[test]
fn interim_responses_are_skipped() {
    let raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n";
    let (r, buf) = parse(raw, false);
    let h = r.unwrap().unwrap();
    assert_eq!(h.status, StatusCode::CREATED);
    assert!(h.headers.get("link").is_none());
    assert!(h.body.is_done());
    assert!(buf.is_empty());
    // A 100 alone: skipped, and the final head is awaited.
    let (r, buf) = parse(b"HTTP/1.1 100 Continue\r\n\r\n", false);
    assert!(r.unwrap().is_none());
    assert!(buf.is_empty());
}

#[test]
fn the_body_framing_follows_rfc_9112() {
    let framing = |raw: &[u8], head: bool| {
        let h = parse(raw, head).0.unwrap().unwrap();
        (h.body, h.keep_alive)
    };
    assert_eq!(
        framing(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: Chunked\r\n\r\n",
            false
        ),
        (Decoder::Chunked(Chunk::Size), true)
    );
    // No length: the body ends with the connection.
    assert_eq!(
        framing(b"HTTP/1.1 200 OK\r\n\r\n", false),
        (Decoder::Close, false)
    );
    // HEAD, 204 and 304 have no body, whatever the headers say.
    assert_eq!(
        framing(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n", true),
        (Decoder::Length(0), true)
    );
    assert_eq!(
        framing(b"HTTP/1.1 204 No Content\r\n\r\n", false),
        (Decoder::Length(0), true)
    );
    assert_eq!(
        framing(
            b"HTTP/1.1 304 Not Modified\r\ncontent-length: 9\r\n\r\n",
            false
        ),
        (Decoder::Length(0), true)
    );
    // Connection: close, and HTTP/1.0 without keep-alive, end the connection.
    assert_eq!(
        framing(
            b"HTTP/1.1 200 OK\r\nconnection: Close\r\ncontent-length: 0\r\n\r\n",
            false
        ),
        (Decoder::Length(0), false)
    );
    assert_eq!(
        framing(b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n", false),
        (Decoder::Length(0), false)
    );
    assert_eq!(
        framing(
            b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n",
            false
        ),
        (Decoder::Length(0), true)
    );
    // The same length twice is one length.
    assert_eq!(
        framing(
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 2\r\n\r\n",
            false
        ),
        (Decoder::Length(2), true)
    );
}

#[test]
fn bad_response_heads_are_refused() {
    let err = |raw: &[u8]| parse(raw, false).0.unwrap_err();
    assert_eq!(
        err(b"SSH-2.0-OpenSSH\r\n\r\n"),
        ProtocolError::Head("not HTTP/1.x")
    );
    assert_eq!(
        err(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n"),
        ProtocolError::Head("conflicting Content-Length values")
    );
    assert_eq!(
        err(b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n"),
        ProtocolError::Head("invalid Content-Length")
    );
    assert_eq!(
        err(b"HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999\r\n\r\n"),
        ProtocolError::Head("invalid Content-Length")
    );
    // Two framings, or a coding other than chunked alone: refused, as nginx does.
    for raw in [
        &b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n"[..],
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n",
    ] {
        assert_eq!(
            err(raw),
            ProtocolError::Head("both Content-Length and Transfer-Encoding")
        );
    }
    for te in [
        "gzip",
        "gzip, chunked",
        "chunked, gzip",
        "chunked\r\ntransfer-encoding: chunked",
        "",
    ] {
        let raw = format!("HTTP/1.1 200 OK\r\ntransfer-encoding: {te}\r\n\r\n");
        assert_eq!(
            err(raw.as_bytes()),
            ProtocolError::Head("unsupported Transfer-Encoding"),
            "{te}"
        );
    }
    // A complete head larger than the limit.
    let mut long = b"HTTP/1.1 200 OK\r\nx-long: ".to_vec();
    long.resize(MAX_HEAD + 6 * 1024, b'a');
    long.extend_from_slice(b"\r\n\r\n");
    assert_eq!(err(&long), ProtocolError::HeadTooLarge);
    assert_eq!(
        err(b"HTTP/1.1 101 Switching Protocols\r\n\r\n"),
        ProtocolError::Head("101 without an upgrade request")
    );
    let mut many = b"HTTP/1.1 200 OK\r\n".to_vec();
    for i in 0..=MAX_HEADERS {
        many.extend_from_slice(format!("x-{i}: 1\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    assert_eq!(err(&many), ProtocolError::Head("more than 100 headers"));
    let mut long = b"HTTP/1.1 200 OK\r\nx-long: ".to_vec();
    long.resize(MAX_HEAD + 10, b'a');
    assert_eq!(err(&long), ProtocolError::HeadTooLarge);
}

#[test]
fn bodies_decode_in_any_pieces() {
    let chunked = b"5;ext=1\r\nhello\r\n1\r\n \r\nA\r\n0123456789\r\n0\r\nx-checksum: 1\r\n\r\n";
    for step in [1, 2, 3, 7, chunked.len()] {
        let (body, exact) = decode_all(Decoder::Chunked(Chunk::Size), chunked, step).unwrap();
        assert_eq!(body, b"hello 0123456789", "step {step}");
        assert!(exact || step < chunked.len());
    }
    // A length: what follows belongs to the connection, not to the body.
    let (body, exact) = decode_all(Decoder::Length(5), b"helloHTTP/1.1", 13).unwrap();
    assert_eq!(body, b"hello");
    assert!(!exact);
    for step in [1, 4] {
        let (body, _) = decode_all(Decoder::Length(5), b"hello", step).unwrap();
        assert_eq!(body, b"hello");
    }
    // Until the connection closes: everything, and no end before it.
    let mut d = Decoder::Close;
    let mut buf = BytesMut::from(&b"all of it"[..]);
    assert_eq!(
        d.decode(&mut buf).unwrap(),
        Decoded::Data(Bytes::from_static(b"all of it"))
    );
    assert_eq!(d.decode(&mut buf).unwrap(), Decoded::More);
}

#[test]
fn bad_chunked_bodies_are_refused() {
    let err = |raw: &[u8]| decode_all(Decoder::Chunked(Chunk::Size), raw, raw.len()).unwrap_err();
    assert_eq!(err(b"zz\r\n"), ProtocolError::Chunked("invalid chunk size"));
    assert_eq!(err(b"\r\n"), ProtocolError::Chunked("invalid chunk size"));
    assert_eq!(
        err(b"fffffffffffffffff\r\n"),
        ProtocolError::Chunked("invalid chunk size")
    );
    assert_eq!(
        err(b"2\r\nabXY"),
        ProtocolError::Chunked("no CRLF after a chunk")
    );
    assert_eq!(
        err(b"5\nhello\r\n"),
        ProtocolError::Chunked("bare CR or LF in a chunk-size line")
    );
    assert_eq!(
        err(b"5;a\rb\r\nhello\r\n"),
        ProtocolError::Chunked("bare CR or LF in a chunk-size line")
    );
    assert_eq!(
        err(&[b'1'; MAX_LINE + 8]),
        ProtocolError::Chunked("line too long")
    );
}
