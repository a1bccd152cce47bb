//! The HTTP/1.1 messages of the router's upstream connections (RFC 9112): the request head written
//! to a variant, the response head parsed from it (with [`httparse`], the parser hyper uses), and
//! the response body's framing, decoded as it arrives.
//!
//! The data port's side (clients, HTTP/1.1 and h2c) is hyper's. The upstream side is this small
//! codec, run by [`super::pool`] in the task of the request it serves: hyper's client runs each
//! connection in a task of its own, and passing every request and response between two tasks cost
//! more than the rest of the router's own work (see docs/design.md).
//!
//! What it does not do: upgrades (`Upgrade` is a hop-by-hop header and is never forwarded, so a
//! `101` is an error), and response trailers, which are read and dropped.

use std::mem::MaybeUninit;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode};
use smallvec::SmallVec;

/// Headers in a response head, at most.
pub const MAX_HEADERS: usize = 100;
/// Bytes of a response head (status line and headers), at most.
pub const MAX_HEAD: usize = 64 * 1024;
/// Bytes of a chunk-size line or of the trailer section, at most.
const MAX_LINE: usize = 4 * 1024;
const MAX_TRAILERS: usize = 16 * 1024;

/// A response the router cannot forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("invalid response head: {0}")]
    Head(&'static str),
    #[error("response head larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("invalid chunked body: {0}")]
    Chunked(&'static str),
}

/// How a request body is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestFraming {
    /// No body.
    Empty,
    /// As many bytes as the request's `Content-Length` says.
    Length,
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// Writes the head of `req` (its URI in origin form, its headers, hop-by-hop ones already removed)
/// into `out`, and says how its body follows. `exact` is the body's length when known, `empty`
/// whether it has none. Exactly one framing header is written, from `empty` and `exact`: any
/// `Content-Length` or `Transfer-Encoding` among the request's headers is left out.
pub fn encode_request<B>(
    req: &Request<B>,
    empty: bool,
    exact: Option<u64>,
    out: &mut Vec<u8>,
) -> RequestFraming {
    out.extend_from_slice(req.method().as_str().as_bytes());
    out.push(b' ');
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    out.extend_from_slice(if target.is_empty() {
        b"/"
    } else {
        target.as_bytes()
    });
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in req.headers() {
        // The framing is written from the body itself below: a client's Content-Length or
        // Transfer-Encoding never reaches the variant as it came.
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let framing = if empty {
        // A method that defines a body says that it has none.
        if matches!(*req.method(), Method::POST | Method::PUT | Method::PATCH) {
            out.extend_from_slice(b"content-length: 0\r\n");
        }
        RequestFraming::Empty
    } else if let Some(n) = exact {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(n.to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
        RequestFraming::Length
    } else {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        RequestFraming::Chunked
    };
    out.extend_from_slice(b"\r\n");
    framing
}

/// Appends one piece of a chunked body.
pub fn encode_chunk(data: &[u8], out: &mut Vec<u8>) {
    if data.is_empty() {
        return;
    }
    encode_chunk_size(data.len(), out);
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// Appends the size line of a chunk of `len` bytes (its data and CRLF follow).
pub fn encode_chunk_size(len: usize, out: &mut Vec<u8>) {
    out.extend_from_slice(format!("{len:x}\r\n").as_bytes());
}

/// The end of a chunked body.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// A parsed response head.
#[derive(Debug)]
pub struct ResponseHead {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Decoder,
    /// The connection may carry another request once this response is read.
    pub keep_alive: bool,
}

/// Parses a response head from the front of `buf` and removes it from there (with any interim `1xx`
/// responses before it), leaving the start of the body. `Ok(None)`: the head is not complete yet.
/// `head_request`: the request was `HEAD`, so the response has no body whatever it says.
pub fn parse_response(
    buf: &mut BytesMut,
    head_request: bool,
) -> Result<Option<ResponseHead>, ProtocolError> {
    loop {
        // Where each header's name and value lie in `buf`: the values are then cut from one frozen
        // copy of the head without copying their bytes.
        // Neither array is filled ahead: a response has a handful of headers, not a hundred.
        let mut spans: SmallVec<[(u32, u32, u32, u32); 24]> = SmallVec::new();
        let mut headers = [const { MaybeUninit::uninit() }; MAX_HEADERS];
        let mut res = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut res,
            buf,
            &mut headers,
        );
        let len = match parsed {
            Ok(httparse::Status::Complete(n)) if n > MAX_HEAD => {
                return Err(ProtocolError::HeadTooLarge)
            }
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
                return Err(ProtocolError::HeadTooLarge)
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(ProtocolError::Head("more than 100 headers"))
            }
            Err(_) => return Err(ProtocolError::Head("not HTTP/1.x")),
        };
        let code = res.code.unwrap_or(0);
        let status =
            StatusCode::from_u16(code).map_err(|_| ProtocolError::Head("invalid status code"))?;
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(ProtocolError::Head("101 without an upgrade request"));
        }
        if status.is_informational() {
            // `100 Continue` and the like: the final response follows.
            buf.advance(len);
            continue;
        }
        let http11 = res.version == Some(1);
        let base = buf.as_ptr() as usize;
        let (mut keep_alive, mut close) = (false, false);
        let mut length: Option<u64> = None;
        let mut lengths = 0;
        let mut chunked = false;
        let count = res.headers.len();
        // Offsets into the head, which is at most `MAX_HEAD` and one read long.
        let at = |p: *const u8| u32::try_from(p as usize - base).unwrap_or(u32::MAX);
        for h in res.headers.iter() {
            let name = h.name.as_bytes();
            spans.push((
                at(h.name.as_ptr()),
                name.len() as u32,
                at(h.value.as_ptr()),
                h.value.len() as u32,
            ));
            if name.eq_ignore_ascii_case(b"content-length") {
                let n = parse_length(h.value)?;
                if length.is_some_and(|l| l != n) {
                    return Err(ProtocolError::Head("conflicting Content-Length values"));
                }
                length = Some(n);
                lengths += 1;
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                // As nginx: `chunked` alone, once. Any other coding (`gzip, chunked`,
                // `chunked, gzip`) would have to be decoded to find the body's end.
                if chunked || !h.value.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                    return Err(ProtocolError::Head("unsupported Transfer-Encoding"));
                }
                chunked = true;
            } else if name.eq_ignore_ascii_case(b"connection") {
                for token in h.value.split(|&b| b == b',') {
                    let token = token.trim_ascii();
                    close |= token.eq_ignore_ascii_case(b"close");
                    keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
                }
            }
        }
        if chunked && length.is_some() {
            // RFC 9112 §6.3 lets a recipient pick chunked; nginx refuses, and so does the
            // router: a message framed two ways is how requests get smuggled.
            return Err(ProtocolError::Head(
                "both Content-Length and Transfer-Encoding",
            ));
        }
        let head = buf.split_to(len).freeze();
        let mut map = HeaderMap::with_capacity(count);
        for &(name_at, name_len, value_at, value_len) in &spans {
            let (name_at, value_at) = (name_at as usize, value_at as usize);
            let name = head
                .get(name_at..name_at + name_len as usize)
                .and_then(|n| HeaderName::from_bytes(n).ok())
                .ok_or(ProtocolError::Head("invalid header name"))?;
            let value = head
                .get(value_at..value_at + value_len as usize)
                .and_then(|_| {
                    HeaderValue::from_maybe_shared(
                        head.slice(value_at..value_at + value_len as usize),
                    )
                    .ok()
                })
                .ok_or(ProtocolError::Head("invalid header value"))?;
            map.append(name, value);
        }
        if lengths > 1 {
            // The same length more than once: forwarded once.
            if let Some(n) = length {
                map.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
            }
        }
        let mut keep_alive = !close && (http11 || keep_alive);
        let body = if head_request
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            Decoder::Length(0)
        } else {
            match (chunked, length) {
                (true, _) => Decoder::Chunked(Chunk::Size),
                (false, None) => {
                    keep_alive = false;
                    Decoder::Close
                }
                (false, Some(n)) => Decoder::Length(n),
            }
        };
        return Ok(Some(ResponseHead {
            status,
            headers: map,
            body,
            keep_alive,
        }));
    }
}

fn parse_length(v: &[u8]) -> Result<u64, ProtocolError> {
    let invalid = ProtocolError::Head("invalid Content-Length");
    let v = v.trim_ascii();
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return Err(invalid);
    }
    v.iter()
        .try_fold(0u64, |n, &d| {
            n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
        })
        .ok_or(invalid)
}

/// Where a response body stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoder {
    /// This many bytes are still to come.
    Length(u64),
    /// A chunked body, at this point of its framing.
    Chunked(Chunk),
    /// The body runs until the upstream closes the connection.
    Close,
    /// The body has ended.
    Done,
}

/// A point in a chunked body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk {
    /// Before a chunk-size line.
    Size,
    /// Inside a chunk, with this many bytes left.
    Data(u64),
    /// After a chunk's data, before its CRLF.
    DataEnd,
    /// After the last chunk: the trailer section, up to its empty line.
    Trailers,
}

/// What the body's bytes in the buffer gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// Body bytes.
    Data(Bytes),
    /// More bytes must be read first.
    More,
    /// The body has ended.
    End,
}

impl Decoder {
    /// Takes what it can from the front of `buf`.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, ProtocolError> {
        loop {
            match *self {
                Decoder::Done | Decoder::Length(0) => {
                    *self = Decoder::Done;
                    return Ok(Decoded::End);
                }
                Decoder::Length(n) => {
                    if buf.is_empty() {
                        return Ok(Decoded::More);
                    }
                    let take = usize::try_from(n).map_or(buf.len(), |n| n.min(buf.len()));
                    *self = Decoder::Length(n - take as u64);
                    return Ok(Decoded::Data(buf.split_to(take).freeze()));
                }
                Decoder::Close => {
                    if buf.is_empty() {
                        return Ok(Decoded::More);
                    }
                    return Ok(Decoded::Data(buf.split().freeze()));
                }
                Decoder::Chunked(Chunk::Size) => {
                    let Some(line) = take_line(buf, MAX_LINE)? else {
                        return Ok(Decoded::More);
                    };
                    if line.iter().any(|&b| b == b'\r' || b == b'\n') {
                        return Err(ProtocolError::Chunked("bare CR or LF in a chunk-size line"));
                    }
                    // `size[;extensions]`; the extensions are ignored.
                    let hex = line[..].split(|&b| b == b';').next().unwrap_or_default();
                    let size = parse_hex(hex.trim_ascii())?;
                    *self = Decoder::Chunked(if size == 0 {
                        Chunk::Trailers
                    } else {
                        Chunk::Data(size)
                    });
                }
                Decoder::Chunked(Chunk::Data(n)) => {
                    if buf.is_empty() {
                        return Ok(Decoded::More);
                    }
                    let take = usize::try_from(n).map_or(buf.len(), |n| n.min(buf.len()));
                    let left = n - take as u64;
                    *self = Decoder::Chunked(if left == 0 {
                        Chunk::DataEnd
                    } else {
                        Chunk::Data(left)
                    });
                    return Ok(Decoded::Data(buf.split_to(take).freeze()));
                }
                Decoder::Chunked(Chunk::DataEnd) => {
                    if buf.len() < 2 {
                        return Ok(Decoded::More);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(ProtocolError::Chunked("no CRLF after a chunk"));
                    }
                    buf.advance(2);
                    *self = Decoder::Chunked(Chunk::Size);
                }
                Decoder::Chunked(Chunk::Trailers) => {
                    // Trailer fields are read and dropped, up to the empty line.
                    let Some(line) = take_line(buf, MAX_TRAILERS)? else {
                        return Ok(Decoded::More);
                    };
                    if line.iter().any(|&b| b == b'\r' || b == b'\n') {
                        return Err(ProtocolError::Chunked("bare CR or LF in a trailer"));
                    }
                    if line.is_empty() {
                        *self = Decoder::Done;
                    }
                }
            }
        }
    }

    /// Whether the body has ended.
    pub fn is_done(&self) -> bool {
        matches!(self, Decoder::Done | Decoder::Length(0))
    }
}

/// Takes one CRLF-ended line (without its CRLF) from the front of `buf`, or `None` while it has
/// not all arrived.
fn take_line(buf: &mut BytesMut, max: usize) -> Result<Option<BytesMut>, ProtocolError> {
    match buf.windows(2).position(|w| w == b"\r\n") {
        Some(end) => {
            let line = buf.split_to(end);
            buf.advance(2);
            Ok(Some(line))
        }
        None if buf.len() > max => Err(ProtocolError::Chunked("line too long")),
        None => Ok(None),
    }
}

fn parse_hex(v: &[u8]) -> Result<u64, ProtocolError> {
    if v.is_empty() || v.len() > 15 {
        return Err(ProtocolError::Chunked("invalid chunk size"));
    }
    v.iter().try_fold(0u64, |n, &d| {
        let digit = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            b'A'..=b'F' => d - b'A' + 10,
            _ => return Err(ProtocolError::Chunked("invalid chunk size")),
        };
        Ok(n << 4 | u64::from(digit))
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
#[path = "h1_fuzz.rs"]
mod fuzz;

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
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
    fn decode_all(
        mut d: Decoder,
        raw: &[u8],
        step: usize,
    ) -> Result<(Vec<u8>, bool), ProtocolError> {
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
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Model: fraud\r\nx-model: v2\r\n\r\nhelloHTTP";
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
        let chunked =
            b"5;ext=1\r\nhello\r\n1\r\n \r\nA\r\n0123456789\r\n0\r\nx-checksum: 1\r\n\r\n";
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
        let err =
            |raw: &[u8]| decode_all(Decoder::Chunked(Chunk::Size), raw, raw.len()).unwrap_err();
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
}
