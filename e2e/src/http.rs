//! A minimal blocking HTTP/1.1 client (one request per connection) for readiness probes and
//! for driving the registry API in tests without pulling in a full client stack.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use crate::EnvError;

/// Largest response body accepted; test blobs are far smaller.
pub const MAX_BODY: u64 = 512 * 1024 * 1024;

/// A complete HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The first header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as (lossy) UTF-8, for messages.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends one request to `host` ("ip:port") and reads the whole response.
/// `target` is the request target, e.g. "/v2/". Adds Host, Content-Length, Connection: close.
pub fn request(
    host: &str,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> Result<Response, EnvError> {
    let ctx = || format!("{method} http://{host}{target}");
    let addr = host
        .to_socket_addrs()
        .map_err(|e| EnvError::http(ctx(), format!("resolving: {e}")))?
        .next()
        .ok_or_else(|| EnvError::http(ctx(), "no address"))?;
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| EnvError::http(ctx(), format!("connecting: {e}")))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|_| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| EnvError::http(ctx(), format!("setting timeouts: {e}")))?;
    let mut head = format!("{method} {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    stream
        .write_all(head.as_bytes())
        .and_then(|_| stream.write_all(body))
        .map_err(|e| EnvError::http(ctx(), format!("sending: {e}")))?;
    read_response(stream, method == "HEAD").map_err(|e| EnvError::http(ctx(), e))
}

fn read_response(stream: TcpStream, head_only: bool) -> Result<Response, String> {
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    read_line(&mut r, &mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| format!("bad status line {line:?}"))?;
    let mut headers = Vec::new();
    loop {
        read_line(&mut r, &mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if headers.len() > 200 {
            return Err("too many headers".into());
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let mut resp = Response {
        status,
        headers,
        body: Vec::new(),
    };
    if head_only || status == 204 || status == 304 || (100..200).contains(&status) {
        return Ok(resp);
    }
    let chunked = resp
        .header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    if chunked {
        loop {
            read_line(&mut r, &mut line)?;
            let size_str = line.trim().split(';').next().unwrap_or("");
            let size = u64::from_str_radix(size_str, 16)
                .map_err(|_| format!("bad chunk size {size_str:?}"))?;
            if size == 0 {
                break;
            }
            if resp.body.len() as u64 + size > MAX_BODY {
                return Err(format!("body larger than {MAX_BODY} bytes"));
            }
            let start = resp.body.len();
            (&mut r)
                .take(size)
                .read_to_end(&mut resp.body)
                .map_err(|e| format!("reading chunk: {e}"))?;
            if (resp.body.len() - start) as u64 != size {
                return Err("truncated chunk".into());
            }
            read_line(&mut r, &mut line)?;
        }
    } else if let Some(len) = resp.header("content-length") {
        let len: u64 = len
            .parse()
            .map_err(|_| format!("bad content-length {len:?}"))?;
        if len > MAX_BODY {
            return Err(format!("body of {len} bytes is larger than {MAX_BODY}"));
        }
        (&mut r)
            .take(len)
            .read_to_end(&mut resp.body)
            .map_err(|e| format!("reading body: {e}"))?;
        if resp.body.len() as u64 != len {
            return Err(format!(
                "body truncated at {} of {len} bytes",
                resp.body.len()
            ));
        }
    } else {
        (&mut r)
            .take(MAX_BODY)
            .read_to_end(&mut resp.body)
            .map_err(|e| format!("reading body: {e}"))?;
    }
    Ok(resp)
}

fn read_line(r: &mut impl BufRead, line: &mut String) -> Result<(), String> {
    line.clear();
    let n = r
        .take(16 * 1024)
        .read_line(line)
        .map_err(|e| format!("reading: {e}"))?;
    if n == 0 {
        return Err("connection closed before the response was complete".into());
    }
    Ok(())
}

/// The path+query part of a Location header, which the registry sends as an absolute URL.
pub fn location_target(location: &str) -> String {
    match location.split_once("://") {
        Some((_, rest)) => match rest.find('/') {
            Some(i) => rest[i..].to_string(),
            None => "/".to_string(),
        },
        None => location.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// Serves one canned response on a loopback port and returns its address.
    fn serve_once(response: &'static [u8]) -> String {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = l.accept() {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf);
                let _ = s.write_all(response);
            }
        });
        addr
    }

    #[test]
    fn reads_chunked_bodies() {
        let host = serve_once(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: b\r\n\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n",
        );
        let r = request(&host, "GET", "/", &[], &[], Duration::from_secs(5)).expect("request");
        assert_eq!(r.status, 200);
        assert_eq!(r.body, b"hello world");
        assert_eq!(r.header("x-a"), Some("b"));
    }

    #[test]
    fn rejects_truncated_bodies() {
        let host = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort");
        let err = request(&host, "GET", "/", &[], &[], Duration::from_secs(5))
            .expect_err("truncated body must fail");
        assert!(err.to_string().contains("truncated"), "{err}");
    }

    #[test]
    fn location_target_strips_scheme_and_host() {
        assert_eq!(
            location_target("http://127.0.0.1:5000/v2/a/blobs/uploads/x?_state=y"),
            "/v2/a/blobs/uploads/x?_state=y"
        );
        assert_eq!(location_target("/v2/a"), "/v2/a");
    }
}
