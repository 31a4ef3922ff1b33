//! A minimal blocking HTTP/1.1 client for exact per-request timings: one keep-alive connection,
//! a pre-built request, and a response parser for `Content-Length`, chunked and close-delimited
//! bodies. Body bytes are attributed to the `read(2)` that brought them, so SSE events that
//! arrive in one read (coalesced by a proxy) share one timestamp.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

pub struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
    pos: usize,
    last_read: Instant,
}

#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body_len: usize,
    /// When the first body byte arrived.
    pub first_body: Option<Instant>,
    /// When each SSE event (`\n\n`-terminated) was complete.
    pub events: Vec<Instant>,
    /// Number of distinct reads that carried body bytes.
    pub body_reads: usize,
    pub close: bool,
}

enum Framing {
    Length(usize),
    Chunked,
    Close,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

impl Conn {
    pub fn connect(addr: SocketAddr) -> io::Result<Conn> {
        let s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(Conn {
            s,
            buf: Vec::with_capacity(64 * 1024),
            pos: 0,
            last_read: Instant::now(),
        })
    }

    /// Read more bytes; `Ok(false)` on EOF.
    fn fill(&mut self) -> io::Result<bool> {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos > 32 * 1024 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        let old = self.buf.len();
        self.buf.resize(old + 16 * 1024, 0);
        let n = self.s.read(&mut self.buf[old..]);
        self.last_read = Instant::now();
        match n {
            Ok(n) => {
                self.buf.truncate(old + n);
                Ok(n > 0)
            }
            Err(e) => {
                self.buf.truncate(old);
                Err(e)
            }
        }
    }

    fn avail(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    /// Send `req` and read the whole response.
    pub fn exchange(&mut self, req: &[u8]) -> io::Result<Reply> {
        self.s.write_all(req)?;
        self.read_reply()
    }

    fn read_reply(&mut self) -> io::Result<Reply> {
        let head_end = loop {
            if let Some(i) = find(self.avail(), b"\r\n\r\n") {
                break i;
            }
            if !self.fill()? {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "eof in headers",
                ));
            }
        };
        let head = std::str::from_utf8(&self.avail()[..head_end])
            .map_err(|_| io::Error::other("non-UTF-8 head"))?
            .to_string();
        self.pos += head_end + 4;
        let mut lines = head.split("\r\n");
        let status: u16 = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| io::Error::other("bad status line"))?;
        let mut framing = Framing::Close;
        let mut close = false;
        for l in lines {
            let Some((k, v)) = l.split_once(':') else {
                continue;
            };
            let (k, v) = (k.trim(), v.trim());
            if k.eq_ignore_ascii_case("content-length") {
                if !matches!(framing, Framing::Chunked) {
                    framing =
                        Framing::Length(v.parse().map_err(|_| io::Error::other("bad length"))?);
                }
            } else if k.eq_ignore_ascii_case("transfer-encoding")
                && v.to_ascii_lowercase().contains("chunked")
            {
                framing = Framing::Chunked;
            } else if k.eq_ignore_ascii_case("connection") && v.eq_ignore_ascii_case("close") {
                close = true;
            }
        }
        let mut reply = Reply {
            status,
            body_len: 0,
            first_body: None,
            events: Vec::new(),
            body_reads: 0,
            close,
        };
        let mut sink = Sink {
            prev: 0,
            last_read_seen: None,
        };
        match framing {
            Framing::Length(mut rem) => {
                while rem > 0 {
                    if self.avail().is_empty() && !self.fill()? {
                        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "eof in body"));
                    }
                    let n = rem.min(self.avail().len());
                    let at = self.last_read;
                    sink.take(&mut reply, &self.buf[self.pos..self.pos + n], at);
                    self.pos += n;
                    rem -= n;
                }
            }
            Framing::Close => loop {
                if !self.avail().is_empty() {
                    let at = self.last_read;
                    let n = self.avail().len();
                    sink.take(&mut reply, &self.buf[self.pos..self.pos + n], at);
                    self.pos += n;
                }
                if !self.fill()? {
                    reply.close = true;
                    break;
                }
            },
            Framing::Chunked => loop {
                let line_end = loop {
                    if let Some(i) = find(self.avail(), b"\r\n") {
                        break i;
                    }
                    if !self.fill()? {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "eof in chunk size",
                        ));
                    }
                };
                let size_txt = std::str::from_utf8(&self.avail()[..line_end])
                    .map_err(|_| io::Error::other("bad chunk size"))?;
                let size =
                    usize::from_str_radix(size_txt.split(';').next().unwrap_or("").trim(), 16)
                        .map_err(|_| io::Error::other("bad chunk size"))?;
                self.pos += line_end + 2;
                if size == 0 {
                    // trailers until the empty line
                    loop {
                        let e = loop {
                            if let Some(i) = find(self.avail(), b"\r\n") {
                                break i;
                            }
                            if !self.fill()? {
                                return Err(io::Error::new(
                                    io::ErrorKind::UnexpectedEof,
                                    "eof in trailer",
                                ));
                            }
                        };
                        self.pos += e + 2;
                        if e == 0 {
                            break;
                        }
                    }
                    break;
                }
                let mut rem = size;
                while rem > 0 {
                    if self.avail().is_empty() && !self.fill()? {
                        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "eof in chunk"));
                    }
                    let n = rem.min(self.avail().len());
                    let at = self.last_read;
                    sink.take(&mut reply, &self.buf[self.pos..self.pos + n], at);
                    self.pos += n;
                    rem -= n;
                }
                while self.avail().len() < 2 {
                    if !self.fill()? {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "eof after chunk",
                        ));
                    }
                }
                self.pos += 2;
            },
        }
        Ok(reply)
    }
}

struct Sink {
    prev: u8,
    last_read_seen: Option<Instant>,
}

impl Sink {
    fn take(&mut self, r: &mut Reply, bytes: &[u8], at: Instant) {
        if bytes.is_empty() {
            return;
        }
        if r.first_body.is_none() {
            r.first_body = Some(at);
        }
        if self.last_read_seen != Some(at) {
            self.last_read_seen = Some(at);
            r.body_reads += 1;
        }
        r.body_len += bytes.len();
        for &b in bytes {
            if b == b'\n' && self.prev == b'\n' {
                r.events.push(at);
                self.prev = 0;
            } else {
                self.prev = b;
            }
        }
    }
}

/// Build a request with a body.
pub fn post(path: &str, headers: &[(&str, &str)], body: &str) -> Vec<u8> {
    let mut r = format!("POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    for (k, v) in headers {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    r.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    r.into_bytes()
}

/// Poll `GET path` on fresh connections until it answers 200 or `limit` passes. Returns the
/// time of the 200.
pub fn wait_ready(addr: SocketAddr, path: &str, limit: Duration) -> Option<Instant> {
    let start = Instant::now();
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    while start.elapsed() < limit {
        if let Ok(mut c) = Conn::connect(addr) {
            if let Ok(r) = c.exchange(req.as_bytes()) {
                if r.status == 200 {
                    return Some(Instant::now());
                }
            }
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    None
}
