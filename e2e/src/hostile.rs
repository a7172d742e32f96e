//! Hostile peers and measurements for the tests of Talaria's caps (docs/trust.md).

/// A "registry" on loopback that answers every request with a 500 whose body never ends
/// (1 GiB claimed, streamed until the client hangs up). Returns its `127.0.0.1:PORT`; it
/// lives as long as the test process.
pub fn endless_error_registry() -> Result<String, crate::EnvError> {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| crate::EnvError::io("binding the endless error registry", e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| crate::EnvError::io("its address", e))?
        .to_string();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf);
                let head = "HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\nContent-Length: 1073741824\r\n\r\n";
                if conn.write_all(head.as_bytes()).is_err() {
                    return;
                }
                let chunk = vec![b'x'; 1 << 16];
                for _ in 0..(1 << 14) {
                    if conn.write_all(&chunk).is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok(addr)
}

/// The peak resident memory (`VmHWM`) of process `pid` so far, in bytes.
pub fn peak_rss(pid: u32) -> Result<u64, crate::EnvError> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path)
        .map_err(|e| crate::EnvError::io(format!("reading {path}"), e))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| crate::EnvError::http(path.clone(), "no VmHWM line"))
}
