//! `kiln health`: asks a running `kiln serve` for `GET /health` and succeeds only on 200. It is
//! the container image's HEALTHCHECK (the slim image has no curl), so it is plain HTTP/1.0 over
//! a std TCP socket: no runtime, no dependencies, a bounded wait.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

/// `Ok(())` when `http://{host}:{port}/health` answers 200 within `timeout`; otherwise what
/// went wrong.
pub fn check(host: &str, port: u16, timeout: Duration) -> Result<(), String> {
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host}:{port}: {e}"))?
        .collect();
    let mut last = format!("no address for {host}:{port}");
    for addr in addrs {
        match ask(addr, host, timeout) {
            Ok(()) => return Ok(()),
            Err(e) => last = e,
        }
    }
    Err(last)
}

fn ask(addr: SocketAddr, host: &str, timeout: Duration) -> Result<(), String> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "GET /health HTTP/1.0\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("cannot send to {addr}: {e}"))?;
    // The status line is all that is needed; /health answers are small.
    let mut head = [0u8; 512];
    let mut n = 0;
    while n < head.len() {
        match stream.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) => return Err(format!("no answer from {addr}: {e}")),
        }
        if head[..n].contains(&b'\n') {
            break;
        }
    }
    let line = String::from_utf8_lossy(&head[..n]);
    let line = line.lines().next().unwrap_or("");
    match line.split_whitespace().nth(1) {
        Some("200") => Ok(()),
        Some(code) => Err(format!("/health answered {code}: {line}")),
        None => Err(format!("not an HTTP answer from {addr}: {line:?}")),
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
