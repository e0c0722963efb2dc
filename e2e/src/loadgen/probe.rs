//! Accounting on the side: server processes' memory and CPU from /proc, and
//! Redis commands from the masters' INFO.

use std::time::Duration;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Memory and CPU of a set of processes, summed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcSample {
    /// Resident set size (VmRSS), KiB.
    pub rss_kb: u64,
    /// User plus system CPU time, seconds.
    pub cpu_secs: f64,
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions; it only reads a constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

fn sample_one(pid: u32) -> anyhow::Result<ProcSample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let rss_kb = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kb| kb.parse::<u64>().ok())
        .with_context(|| format!("no VmRSS in /proc/{pid}/status"))?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces and parentheses: count
    // fields from the last ')'. utime and stime are fields 14 and 15.
    let after_name = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("malformed /proc/PID/stat")?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<u64> {
        Ok(fields
            .get(i)
            .context("short /proc/PID/stat")?
            .parse::<u64>()?)
    };
    // after_name starts at field 3 (state): field n is at index n - 3.
    let cpu_ticks = ticks(14 - 3)? + ticks(15 - 3)?;
    Ok(ProcSample {
        rss_kb,
        cpu_secs: cpu_ticks as f64 / clock_ticks_per_second(),
    })
}

/// The summed sample of `pids`; `None` when there are none to sample.
pub fn sample(pids: &[u32]) -> anyhow::Result<Option<ProcSample>> {
    if pids.is_empty() {
        return Ok(None);
    }
    let mut total = ProcSample::default();
    for pid in pids {
        let one = sample_one(*pid)?;
        total.rss_kb += one.rss_kb;
        total.cpu_secs += one.cpu_secs;
    }
    Ok(Some(total))
}

/// This process.
pub fn sample_self() -> ProcSample {
    sample_one(std::process::id()).unwrap_or_default()
}

fn host_port(node: &str) -> &str {
    let node = node.trim();
    let node = node
        .strip_prefix("redis://")
        .or_else(|| node.strip_prefix("rediss://"))
        .unwrap_or(node);
    node.trim_end_matches('/')
}

/// One `INFO` of a Redis node: its role and total_commands_processed.
async fn info(node: &str) -> anyhow::Result<(bool, u64)> {
    let addr = host_port(node);
    let mut stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .with_context(|| format!("connecting to redis {addr} timed out"))??;
    stream.write_all(b"INFO\r\n").await?;
    let mut reply = Vec::with_capacity(8192);
    let mut chunk = [0u8; 8192];
    // A bulk string: `$<len>\r\n<body>\r\n`.
    let body = loop {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk)).await??;
        anyhow::ensure!(n > 0, "redis {addr} closed the connection");
        reply.extend_from_slice(&chunk[..n]);
        let Some(header_end) = reply.windows(2).position(|w| w == b"\r\n") else {
            continue;
        };
        let header = std::str::from_utf8(&reply[..header_end])?;
        let len: usize = header
            .strip_prefix('$')
            .with_context(|| format!("unexpected INFO reply from {addr}: {header}"))?
            .parse()?;
        if reply.len() >= header_end + 2 + len {
            break String::from_utf8_lossy(&reply[header_end + 2..header_end + 2 + len])
                .into_owned();
        }
    };
    let field = |name: &str| {
        body.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
    };
    let master = field("role") == Some("master");
    let commands = field("total_commands_processed")
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no total_commands_processed from {addr}"))?;
    Ok((master, commands))
}

/// Commands processed so far by the masters among `nodes`. Replicas are left
/// out: they replay what their master processed.
pub async fn redis_commands(nodes: &[String]) -> anyhow::Result<Option<u64>> {
    if nodes.is_empty() {
        return Ok(None);
    }
    let mut total = 0;
    for node in nodes {
        let (master, commands) = info(node).await?;
        if master {
            total += commands;
        }
    }
    Ok(Some(total))
}
