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
#[path = "h1_tests.rs"]
mod tests;
