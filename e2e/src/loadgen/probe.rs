//! Accounting on the side: server processes' memory and CPU from /proc, and
//! from the Redis masters their commands (INFO), memory and the change log's
//! size.

use std::collections::BTreeMap;
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

/// A reply of a Redis node.
#[derive(Debug)]
enum Reply {
    Text(String),
    Int(i64),
    Nil,
    List(Vec<Reply>),
}

/// One parsed reply from the front of `buf`, with the bytes it took, or
/// `None` if `buf` does not hold all of it yet.
fn parse(buf: &[u8]) -> anyhow::Result<Option<(Reply, usize)>> {
    let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    let line = std::str::from_utf8(&buf[1..eol])?;
    let mut used = eol + 2;
    let reply = match buf.first() {
        Some(b'+') => Reply::Text(line.to_owned()),
        Some(b'-') => anyhow::bail!("redis error: {line}"),
        Some(b':') => Reply::Int(line.parse()?),
        Some(b'$') => match line.parse::<i64>()? {
            -1 => Reply::Nil,
            len => {
                let len = usize::try_from(len)?;
                if buf.len() < used + len + 2 {
                    return Ok(None);
                }
                let text = String::from_utf8_lossy(&buf[used..used + len]).into_owned();
                used += len + 2;
                Reply::Text(text)
            }
        },
        Some(b'*') => {
            let mut items = Vec::new();
            for _ in 0..line.parse::<i64>()?.max(0) {
                let Some((item, n)) = parse(&buf[used..])? else {
                    return Ok(None);
                };
                items.push(item);
                used += n;
            }
            Reply::List(items)
        }
        _ => anyhow::bail!("unexpected reply {line:?}"),
    };
    Ok(Some((reply, used)))
}

/// A connection to one Redis node, for a few commands on the side (the
/// generator has no Redis client of its own, and needs none for this).
struct Node {
    addr: String,
    stream: TcpStream,
}

impl Node {
    async fn connect(node: &str) -> anyhow::Result<Self> {
        let addr = host_port(node).to_owned();
        let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(&addr))
            .await
            .with_context(|| format!("connecting to redis {addr} timed out"))??;
        Ok(Node { addr, stream })
    }

    async fn call(&mut self, args: &[&str]) -> anyhow::Result<Reply> {
        let mut request = format!("*{}\r\n", args.len());
        for arg in args {
            request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        self.stream.write_all(request.as_bytes()).await?;
        let mut reply = Vec::with_capacity(8192);
        let mut chunk = [0u8; 8192];
        loop {
            if let Some((parsed, _)) =
                parse(&reply).with_context(|| format!("redis {}", self.addr))?
            {
                return Ok(parsed);
            }
            let n = tokio::time::timeout(Duration::from_secs(5), self.stream.read(&mut chunk))
                .await??;
            anyhow::ensure!(n > 0, "redis {} closed the connection", self.addr);
            reply.extend_from_slice(&chunk[..n]);
        }
    }

    async fn int(&mut self, args: &[&str]) -> anyhow::Result<u64> {
        match self.call(args).await? {
            Reply::Int(n) => Ok(u64::try_from(n).unwrap_or(0)),
            Reply::Nil => Ok(0),
            other => anyhow::bail!("{args:?}: expected a number, got {other:?}"),
        }
    }

    /// `INFO section` as `field -> value`.
    async fn info(&mut self, section: &str) -> anyhow::Result<BTreeMap<String, String>> {
        let Reply::Text(body) = self.call(&["INFO", section]).await? else {
            anyhow::bail!("unexpected INFO reply from {}", self.addr);
        };
        Ok(body
            .lines()
            .filter_map(|line| line.split_once(':'))
            .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
            .collect())
    }

    /// The keys of this node matching `pattern` of type `kind`.
    async fn scan(&mut self, pattern: &str, kind: &str) -> anyhow::Result<Vec<String>> {
        let mut keys = Vec::new();
        let mut cursor = "0".to_owned();
        loop {
            let reply = self
                .call(&[
                    "SCAN", &cursor, "MATCH", pattern, "COUNT", "1000", "TYPE", kind,
                ])
                .await?;
            let Reply::List(mut parts) = reply else {
                anyhow::bail!("unexpected SCAN reply from {}", self.addr);
            };
            if let (Some(Reply::List(found)), Some(Reply::Text(next))) = (parts.pop(), parts.pop())
            {
                keys.extend(found.into_iter().filter_map(|k| match k {
                    Reply::Text(k) => Some(k),
                    _ => None,
                }));
                cursor = next;
            }
            if cursor == "0" {
                return Ok(keys);
            }
        }
    }
}

/// The masters' counters the generator compares across a window.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RedisSample {
    /// total_commands_processed: commands run inside scripts count too.
    pub commands: u64,
    /// Calls per command (INFO commandstats), scripts' inner calls included.
    pub calls: BTreeMap<String, u64>,
    /// used_memory.
    pub used_memory: u64,
    /// Entries of the change log's streams (`presence:*:log`), and their
    /// memory (MEMORY USAGE, every node of the streams counted).
    pub log_entries: u64,
    pub log_bytes: u64,
}

/// Commands processed so far by the masters among `nodes`. Replicas are left
/// out: they replay what their master processed.
pub async fn redis_commands(nodes: &[String]) -> anyhow::Result<Option<u64>> {
    Ok(redis_sample(nodes, false).await?.map(|s| s.commands))
}

/// The masters among `nodes`, summed; with `detail`, their command calls,
/// memory and the change log's size as well.
pub async fn redis_sample(nodes: &[String], detail: bool) -> anyhow::Result<Option<RedisSample>> {
    if nodes.is_empty() {
        return Ok(None);
    }
    let mut total = RedisSample::default();
    for node in nodes {
        let mut node = Node::connect(node).await?;
        let stats = node.info(if detail { "all" } else { "default" }).await?;
        if stats.get("role").map(String::as_str) != Some("master") {
            continue;
        }
        total.commands += stats
            .get("total_commands_processed")
            .and_then(|v| v.parse::<u64>().ok())
            .with_context(|| format!("no total_commands_processed from {}", node.addr))?;
        if !detail {
            continue;
        }
        total.used_memory += stats
            .get("used_memory")
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        for (field, value) in &stats {
            let Some(command) = field.strip_prefix("cmdstat_") else {
                continue;
            };
            let calls = value
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
            *total.calls.entry(command.to_owned()).or_default() += calls;
        }
        for key in node.scan("presence:*:log", "stream").await? {
            total.log_entries += node.int(&["XLEN", &key]).await?;
            total.log_bytes += node.int(&["MEMORY", "USAGE", &key, "SAMPLES", "0"]).await?;
        }
    }
    Ok(Some(total))
}
