//! `kiln health` and `kiln models ls`: ask a running `kiln serve` over plain HTTP/1.0 on a std
//! TCP socket (no runtime, no dependencies, a bounded wait). `kiln health` is the container
//! image's HEALTHCHECK (the slim image has no curl): it succeeds only on `GET /health` = 200.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

/// `Ok(())` when `http://{host}:{port}/health` answers 200 within `timeout`; otherwise what
/// went wrong.
pub fn check(host: &str, port: u16, timeout: Duration) -> Result<(), String> {
    let (status, line, _) = request(host, port, "GET /health", &[], timeout)?;
    match status {
        200 => Ok(()),
        code => Err(format!("/health answered {code}: {line}")),
    }
}

/// Most bytes of an answer [`request`] reads (`kiln models ls` reads a model list).
const MAX_ANSWER: usize = 4 << 20;

/// One HTTP/1.0 request (`request_line` is `METHOD PATH`, `headers` extra `Name: value` lines)
/// to a local kiln: the status, the status line and the body.
pub fn request(
    host: &str,
    port: u16,
    request_line: &str,
    headers: &[String],
    timeout: Duration,
) -> Result<(u16, String, Vec<u8>), String> {
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host}:{port}: {e}"))?
        .collect();
    let mut last = format!("no address for {host}:{port}");
    for addr in addrs {
        match ask(addr, host, request_line, headers, timeout) {
            Ok(answer) => return Ok(answer),
            Err(e) => last = e,
        }
    }
    Err(last)
}

fn ask(
    addr: SocketAddr,
    host: &str,
    request_line: &str,
    headers: &[String],
    timeout: Duration,
) -> Result<(u16, String, Vec<u8>), String> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| e.to_string())?;
    let mut head = format!("{request_line} HTTP/1.0\r\nHost: {host}\r\nConnection: close\r\n");
    for h in headers {
        head.push_str(h);
        head.push_str("\r\n");
    }
    if request_line.starts_with("POST ") {
        head.push_str("Content-Length: 0\r\n");
    }
    head.push_str("\r\n");
    stream
        .write_all(head.as_bytes())
        .map_err(|e| format!("cannot send to {addr}: {e}"))?;
    // HTTP/1.0 with `Connection: close`: the answer ends when the server closes.
    let mut answer = Vec::new();
    stream
        .take(MAX_ANSWER as u64)
        .read_to_end(&mut answer)
        .map_err(|e| format!("no answer from {addr}: {e}"))?;
    let text_end = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(answer.len(), |p| p + 4);
    let head = String::from_utf8_lossy(&answer[..text_end]).into_owned();
    let line = head.lines().next().unwrap_or("").to_string();
    match line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
    {
        Some(code) if line.starts_with("HTTP/") => Ok((code, line, answer[text_end..].to_vec())),
        _ => Err(format!("not an HTTP answer from {addr}: {line:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn serve_once(answer: &'static str) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 256];
            let _ = s.read(&mut buf);
            let _ = s.write_all(answer.as_bytes());
        });
        port
    }

    #[test]
    fn ok_only_on_200() {
        let t = Duration::from_secs(5);
        let port = serve_once("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}");
        assert!(check("127.0.0.1", port, t).is_ok());
        let port = serve_once("HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\n{\"a\":1}");
        let (status, _, body) = request("127.0.0.1", port, "GET /v1/models", &[], t).unwrap();
        assert_eq!((status, body.as_slice()), (200, &b"{\"a\":1}"[..]));
        let port = serve_once("HTTP/1.1 503 Service Unavailable\r\n\r\n");
        assert!(check("127.0.0.1", port, t).unwrap_err().contains("503"));
        let port = serve_once("garbage");
        assert!(check("127.0.0.1", port, t).is_err());
        // Nothing listening.
        let free = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = free.local_addr().unwrap().port();
        drop(free);
        assert!(check("127.0.0.1", port, t).is_err());
    }
}
