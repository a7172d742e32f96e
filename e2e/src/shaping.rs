//! A network namespace joined to this one by a rate-limited veth pair.
//!
//! Addresses come from 10.213.N.0/30 (our private test range): 10.213.N.1 on the host end,
//! 10.213.N.2 inside the namespace. The namespace has no default route, so what runs in it is
//! reachable only from this machine. The veth name `tlrNh` doubles as an allocation lock:
//! creating it fails if another test (or process) holds N.

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::Duration;

use crate::process::{run, run_ok};
use crate::{EnvError, tool};

const CMD_TIMEOUT: Duration = Duration::from_secs(20);

pub(crate) struct Netns {
    pub(crate) name: String,
    host_if: String,
    pub(crate) index: u8,
    /// Set once the namespace end is inside the namespace: deleting the namespace then
    /// removes the pair, and we must not touch `host_if` (the slot may be reused at once).
    moved: std::sync::atomic::AtomicBool,
}

static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl Netns {
    /// Creates the namespace and the veth pair, with `tbf` at `rate_mbit` on both ends.
    pub(crate) fn create(rate_mbit: u32) -> Result<Netns, EnvError> {
        if rate_mbit == 0 {
            return Err(EnvError::Shaping("rate must be at least 1 Mbit/s".into()));
        }
        let ip = tool("ip")?;
        let tc = tool("tc")?;
        let start = (std::process::id() % 200) as u8;
        let mut last_err = String::new();
        for i in 0..250u16 {
            let index = ((u16::from(start) + i) % 250 + 1) as u8;
            let host_if = format!("tlr{index}h");
            let ns_if = format!("tlr{index}n");
            let mut add = Command::new(&ip);
            add.args([
                "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
            ]);
            let out = run(add, CMD_TIMEOUT)?;
            if !out.status.success() {
                last_err = String::from_utf8_lossy(&out.stderr).trim().to_string();
                if last_err.contains("exists") {
                    continue;
                }
                return Err(EnvError::Shaping(format!(
                    "creating veth {host_if}: {last_err}"
                )));
            }
            let seq = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let netns = Netns {
                // Unique per process and handle, so no one deletes another's namespace.
                name: format!("talaria-t{index}-{}-{seq}", std::process::id()),
                host_if,
                index,
                moved: std::sync::atomic::AtomicBool::new(false),
            };
            // From here on, Drop removes whatever was created.
            netns.configure(&ip, &tc, &ns_if, rate_mbit)?;
            return Ok(netns);
        }
        Err(EnvError::Shaping(format!(
            "no free 10.213.N.0/30 slot (last error: {last_err})"
        )))
    }

    fn configure(
        &self,
        ip: &std::path::Path,
        tc: &std::path::Path,
        ns_if: &str,
        rate_mbit: u32,
    ) -> Result<(), EnvError> {
        let ns = self.name.as_str();
        let host_addr = format!("{}/30", self.host_ip());
        let ns_addr = format!("{}/30", self.ns_ip());
        let rate = format!("{rate_mbit}mbit");
        // tbf needs a bucket of at least one timer tick of traffic; 10 ms worth, >= 64 KiB.
        let burst = (u64::from(rate_mbit) * 1_000_000 / 8 / 100)
            .max(64 * 1024)
            .to_string();
        let steps: Vec<(&std::path::Path, Vec<&str>)> = vec![
            (ip, vec!["netns", "add", ns]),
            (ip, vec!["link", "set", ns_if, "netns", ns]),
            (ip, vec!["addr", "add", &host_addr, "dev", &self.host_if]),
            (ip, vec!["link", "set", &self.host_if, "up"]),
            (ip, vec!["-n", ns, "addr", "add", &ns_addr, "dev", ns_if]),
            (ip, vec!["-n", ns, "link", "set", ns_if, "up"]),
            (ip, vec!["-n", ns, "link", "set", "lo", "up"]),
            (
                tc,
                vec![
                    "qdisc",
                    "add",
                    "dev",
                    &self.host_if,
                    "root",
                    "tbf",
                    "rate",
                    &rate,
                    "burst",
                    &burst,
                    "latency",
                    "200ms",
                ],
            ),
            (
                tc,
                vec![
                    "-n", ns, "qdisc", "add", "dev", ns_if, "root", "tbf", "rate", &rate, "burst",
                    &burst, "latency", "200ms",
                ],
            ),
        ];
        for (i, (prog, args)) in steps.into_iter().enumerate() {
            let mut cmd = Command::new(prog);
            cmd.args(&args);
            run_ok(cmd, CMD_TIMEOUT).map_err(|e| EnvError::Shaping(e.to_string()))?;
            if i == 1 {
                self.moved.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
        Ok(())
    }

    pub(crate) fn host_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 213, self.index, 1)
    }

    pub(crate) fn ns_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 213, self.index, 2)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let Ok(ip) = tool("ip") else { return };
        let mut del_ns = Command::new(&ip);
        del_ns.args(["netns", "del", &self.name]);
        let _ = run(del_ns, CMD_TIMEOUT);
        if !self.moved.load(std::sync::atomic::Ordering::Relaxed) {
            let mut del_link = Command::new(&ip);
            del_link.args(["link", "del", &self.host_if]);
            let _ = run(del_link, CMD_TIMEOUT);
        }
    }
}
