//! A tiny blocking HTTP/1.1 client on `std::net`, one connection per
//! request (`Connection: close`), that tells apart the two ways a request
//! can go wrong: never sent (the connection could not be made, so a write
//! certainly did not happen) and lost after it went out (it may or may not
//! have taken effect).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Waiting for a connection (a SIGSTOPped server still accepts: the
/// kernel completes the handshake, so this only bounds dead ports).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Waiting for each read or write once connected.
pub const IO_TIMEOUT: Duration = Duration::from_secs(3);

/// An HTTP answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

/// How a request ended.
#[derive(Debug)]
pub enum Reply {
    /// The server answered.
    Answer(Answer),
    /// Nothing was sent: no connection.
    NotSent(String),
    /// Sent (perhaps partly), then no whole answer: a timeout, a reset.
    Lost(String),
}

/// `method path` with `body` to 127.0.0.1:`port`.
pub fn request(method: &str, port: u16, path: &str, body: &str) -> Reply {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
        Ok(s) => s,
        Err(e) => return Reply::NotSent(format!("connect: {e}")),
    };
    if s.set_read_timeout(Some(IO_TIMEOUT)).is_err()
        || s.set_write_timeout(Some(IO_TIMEOUT)).is_err()
    {
        // Not one byte has gone out yet.
        return Reply::NotSent("cannot set socket timeouts".into());
    }
    let _ = s.set_nodelay(true);
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if let Err(e) = s.write_all(req.as_bytes()) {
        return Reply::Lost(format!("send: {e}"));
    }
    let mut raw = Vec::new();
    if let Err(e) = s.read_to_end(&mut raw) {
        return Reply::Lost(format!("receive: {e}"));
    }
    match parse(&raw) {
        Some(a) => Reply::Answer(a),
        None => Reply::Lost(format!("unparsable answer of {} bytes", raw.len())),
    }
}

/// Status line and body; the body ends at `Content-Length` when given
/// (the server closes the connection anyway).
fn parse(raw: &[u8]) -> Option<Answer> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..split]).ok()?;
    let mut body = &raw[split + 4..];
    let mut lines = head.lines();
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    for l in lines {
        if let Some((k, v)) = l.split_once(':')
            && k.trim().eq_ignore_ascii_case("content-length")
        {
            let len: usize = v.trim().parse().ok()?;
            // A short body is a cut connection, not an answer.
            body = body.get(..len)?;
        }
    }
    Some(Answer {
        status,
        body: String::from_utf8_lossy(body).into_owned(),
    })
}

/// A GET that must answer 200 within the timeouts, as JSON.
pub fn get_json(port: u16, path: &str) -> Option<serde_json::Value> {
    match request("GET", port, path, "") {
        Reply::Answer(a) if a.status == 200 => serde_json::from_str(&a.body).ok(),
        _ => None,
    }
}
