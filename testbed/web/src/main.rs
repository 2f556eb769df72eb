//! The compose testbed's demo backend (`web`).
//!
//! `switchyard-testbed-web [ADDR]` (default `0.0.0.0:80`) answers every
//! HTTP request with this container's host name and a newline, so that
//! `curl http://web/` from the testbed's client shows which replica
//! answered. Standard library only, one thread per connection: it exists
//! to make balancing visible, not to be fast.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "0.0.0.0:80".to_owned());
    let listener = TcpListener::bind(&addr).unwrap_or_else(|e| {
        eprintln!("switchyard-testbed-web: binding {addr}: {e}");
        std::process::exit(1)
    });
    let name = host_name();
    eprintln!("switchyard-testbed-web: {name} listening on {addr}");
    for conn in listener.incoming().flatten() {
        let name = name.clone();
        std::thread::spawn(move || {
            let _ = serve(conn, &name);
        });
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// Answers the requests of one connection (keep-alive) until the client
/// closes it, goes quiet for 10 s, or sends something that is not HTTP.
fn serve(conn: TcpStream, name: &str) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut out = conn;
    let body = format!("{name}\n");
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        let mut close = request_line.ends_with("HTTP/1.0\r\n");
        // Headers until the blank line; bodies are not expected.
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header)? == 0 {
                return Ok(());
            }
            let lower = header.to_ascii_lowercase();
            if lower.starts_with("connection:") && lower.contains("close") {
                close = true;
            }
            if header == "\r\n" || header == "\n" {
                break;
            }
        }
        if !request_line.contains(" HTTP/1.") {
            out.write_all(
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )?;
            return Ok(());
        }
        write!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{}\r\n{body}",
            body.len(),
            if close { "Connection: close\r\n" } else { "" },
        )?;
        if close {
            return Ok(());
        }
    }
}
