//! Real `presence-server` processes on one real Redis Cluster, for the
//! multi-node tests (`cluster.rs`): the binary cargo built, one process per
//! node on a free port, its output in a log file under `target/`, readiness
//! through the gRPC health check, SIGKILL and SIGTERM, and the cluster script
//! for failovers and restarts.
//!
//! The cluster is the one `PRESENCE_TEST_REDIS_CLUSTER` names (comma-separated
//! `redis://host:port` URLs, as `e2e/scripts/redis-cluster.sh start` prints).
//! Fault injection (`kill-master`, `restart-node`, `restart-empty`) goes
//! through that script, told the cluster's base port (the lowest port of the
//! URLs) and, when set, `REDIS_CLUSTER_DIR`.
//!
//! The tests on real services (`cluster.rs`, `degraded.rs`) also share from
//! here how the environment names the services, the scripts that stop and
//! start them, and running one test at a time.
#![allow(dead_code)]

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use clap::Parser;
use presence_server::config::{Cli, Config};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use super::support::{duration_flag, timer_flags};

/// How long a node may hold its lease in the shared hot store without
/// renewing it (it renews every third of it).
pub const NODE_LEASE: Duration = Duration::from_millis(1500);

/// How long a node waits for one Redis call. Shorter than a master failover
/// of the test cluster (3–5 s with its 2 s node timeout), so that the
/// failover test takes the degraded path, as a loaded machine would.
pub const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a server process may take to serve after it was spawned: it
/// connects to the cluster and proves its 256 fan-out channels first.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// The comma-separated addresses the environment variable `var` names.
/// Unset: a note and `None` (the test passes without running), unless
/// `PRESENCE_REQUIRE_BACKENDS=1` makes that a failure. `script` is the one in
/// `e2e/scripts` that starts the service.
pub fn backend_from_env(var: &str, script: &str) -> Option<Vec<String>> {
    let addresses: Vec<String> = std::env::var(var)
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|address| !address.is_empty())
        .map(str::to_owned)
        .collect();
    if !addresses.is_empty() {
        return Some(addresses);
    }
    let start = format!("export {var}=$(e2e/scripts/{script} start | tail -1)");
    assert!(
        std::env::var("PRESENCE_REQUIRE_BACKENDS").as_deref() != Ok("1"),
        "PRESENCE_REQUIRE_BACKENDS=1 but {var} is unset; start it with: {start}"
    );
    println!("note: {var} is unset, skipping this test ({start})");
    None
}

/// One test at a time: the tests share the services, and some take them down.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: OnceLock<tokio::sync::Mutex<()>> = OnceLock::new();
    LOCK.get_or_init(|| tokio::sync::Mutex::new(()))
        .lock()
        .await
}

/// Runs `e2e/scripts/NAME ARGS` with `env`, returning stdout, or what failed.
/// Never panics: it also runs from `Drop` while a test panics.
pub fn run_script(name: &str, args: &[&str], env: &[(&str, String)]) -> Result<String, String> {
    let path = workspace_root().join("e2e/scripts").join(name);
    let started = Instant::now();
    let output = Command::new(&path)
        .args(args)
        .envs(env.iter().map(|(key, value)| (*key, value.as_str())))
        .stdin(Stdio::null())
        .output()
        .map_err(|error| format!("cannot run {}: {error}", path.display()))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!(
        "{name} {} took {:?}: {}",
        args.join(" "),
        started.elapsed(),
        stderr.trim().lines().last().unwrap_or_default()
    );
    if !output.status.success() {
        return Err(format!(
            "{name} {} failed ({}):\n{stderr}",
            args.join(" "),
            output.status
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The cluster `PRESENCE_TEST_REDIS_CLUSTER` names, or `None` (see
/// [`backend_from_env`]).
pub fn redis_cluster() -> Option<RedisCluster> {
    let urls = backend_from_env("PRESENCE_TEST_REDIS_CLUSTER", "redis-cluster.sh")?;
    let ports: Vec<(String, u16)> = urls
        .iter()
        .map(|url| {
            let hostport = url
                .trim_start_matches("redis://")
                .rsplit('@')
                .next()
                .unwrap_or_default()
                .trim_end_matches('/');
            let (host, port) = hostport
                .rsplit_once(':')
                .unwrap_or_else(|| panic!("no port in redis URL {url:?}"));
            (
                host.to_owned(),
                port.parse()
                    .unwrap_or_else(|_| panic!("bad port in {url:?}")),
            )
        })
        .collect();
    let host = ports[0].0.clone();
    let base_port = ports.iter().map(|(_, port)| *port).min().unwrap();
    Some(RedisCluster {
        urls,
        host,
        ports: ports.into_iter().map(|(_, port)| port).collect(),
        base_port,
    })
}

/// The Redis Cluster under test.
#[derive(Clone, Debug)]
pub struct RedisCluster {
    pub urls: Vec<String>,
    pub host: String,
    pub ports: Vec<u16>,
    /// The lowest port: the script's `REDIS_CLUSTER_BASE_PORT`.
    pub base_port: u16,
}

/// One master: its port and the slot ranges it serves.
#[derive(Clone, Debug)]
pub struct Master {
    pub port: u16,
    pub slots: Vec<(u16, u16)>,
}

impl RedisCluster {
    pub fn seeds(&self) -> String {
        self.urls.join(",")
    }

    /// Runs `e2e/scripts/redis-cluster.sh ARGS` for this cluster and returns
    /// its stdout; panics with its stderr if it fails.
    pub fn script(&self, args: &[&str]) -> String {
        self.try_script(args)
            .unwrap_or_else(|failure| panic!("{failure}"))
    }

    /// Like [`script`](Self::script), returning a failure as what failed.
    pub fn try_script(&self, args: &[&str]) -> Result<String, String> {
        let base_port = ("REDIS_CLUSTER_BASE_PORT", self.base_port.to_string());
        run_script("redis-cluster.sh", args, &[base_port])
    }

    /// What `redis-cli -p PORT ARGS...` prints, trimmed, or `None` if that node
    /// does not answer.
    pub fn cli(&self, port: u16, args: &[&str]) -> Option<String> {
        let output = Command::new("timeout")
            .args(["5", "redis-cli", "-h", &self.host, "-p", &port.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .ok()?;
        output.status.success().then(|| {
            String::from_utf8_lossy(&output.stdout)
                .trim()
                .replace('\r', "")
        })
    }

    /// The masters serving slots, as the first node that answers sees them.
    pub fn masters(&self) -> Vec<Master> {
        let nodes = self
            .ports
            .iter()
            .find_map(|port| self.cli(*port, &["cluster", "nodes"]))
            .expect("no cluster node answers CLUSTER NODES");
        nodes
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                // id addr flags master ping pong epoch link slot...
                if fields.len() < 9 || !fields[2].contains("master") || fields[2].contains("fail") {
                    return None;
                }
                let port = fields[1]
                    .split('@')
                    .next()?
                    .rsplit(':')
                    .next()?
                    .parse()
                    .ok()?;
                let slots = fields[8..]
                    .iter()
                    .filter(|range| !range.starts_with('['))
                    .filter_map(|range| match range.split_once('-') {
                        Some((from, to)) => Some((from.parse().ok()?, to.parse().ok()?)),
                        None => range.parse().ok().map(|slot| (slot, slot)),
                    })
                    .collect();
                Some(Master { port, slots })
            })
            .collect()
    }

    /// The port of the master serving `slot`.
    pub fn master_of_slot(&self, slot: u16) -> u16 {
        self.masters()
            .into_iter()
            .find(|m| {
                m.slots
                    .iter()
                    .any(|(from, to)| (*from..=*to).contains(&slot))
            })
            .unwrap_or_else(|| panic!("no master serves slot {slot}"))
            .port
    }

    /// Whether the node on `port` answers as a master.
    pub fn is_master(&self, port: u16) -> bool {
        self.cli(port, &["info", "replication"])
            .is_some_and(|info| info.lines().any(|line| line == "role:master"))
    }
}

/// The flags of every node: the test timers and this cluster.
fn server_args(seeds: &str) -> Vec<String> {
    let mut args: Vec<String> = vec!["--dev".into(), "--redis-cluster".into(), seeds.into()];
    args.extend(timer_flags());
    args.extend([
        "--node-lease".into(),
        duration_flag(NODE_LEASE),
        "--redis-timeout".into(),
        duration_flag(REDIS_TIMEOUT),
    ]);
    args
}

/// The configuration every node of these tests runs with.
pub fn node_config(cluster: &RedisCluster) -> Config {
    let mut args = vec!["presence-server".to_owned()];
    args.extend(server_args(&cluster.seeds()));
    Cli::parse_from(args).config
}

/// The workspace root (this package's parent).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e lives in the workspace")
        .to_path_buf()
}

/// `target/<profile>`: the directory of this test binary's `deps/`.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    exe.parent()
        .and_then(Path::parent)
        .expect("test binaries live in target/<profile>/deps")
        .to_path_buf()
}

/// The `presence-server` binary: `PRESENCE_SERVER_BIN` if set, else the one
/// cargo builds for this profile, built (or brought up to date) once per test
/// binary, since `cargo test -p presence-e2e` builds only the library.
pub fn server_binary() -> PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY
        .get_or_init(|| {
            if let Some(bin) = std::env::var_os("PRESENCE_SERVER_BIN") {
                return PathBuf::from(bin);
            }
            let profile_dir = profile_dir();
            let binary = profile_dir.join("presence-server");
            let profile = profile_dir
                .file_name()
                .and_then(|name| name.to_str())
                .unwrap_or("debug")
                .to_owned();
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut build = Command::new(cargo);
            build
                .current_dir(workspace_root())
                .args(["build", "--quiet", "-p", "presence-server", "--bin", "presence-server"]);
            match profile.as_str() {
                "debug" => {}
                "release" => {
                    build.arg("--release");
                }
                other => {
                    build.args(["--profile", other]);
                }
            }
            // Same target dir as this test binary, wherever it is.
            if let Some(target) = profile_dir.parent() {
                build.env("CARGO_TARGET_DIR", target);
            }
            let started = Instant::now();
            let built = build.status();
            match built {
                Ok(status) if status.success() => {
                    println!("presence-server built/up to date in {:?}", started.elapsed());
                }
                Ok(status) if binary.exists() => println!(
                    "warning: `cargo build -p presence-server` failed ({status}); using the existing {}",
                    binary.display()
                ),
                Ok(status) => panic!("`cargo build -p presence-server` failed ({status})"),
                Err(error) if binary.exists() => println!(
                    "warning: cannot run cargo ({error}); using the existing {}",
                    binary.display()
                ),
                Err(error) => panic!("cannot run cargo to build presence-server: {error}"),
            }
            assert!(binary.exists(), "{} missing after the build", binary.display());
            binary
        })
        .clone()
}

/// Where the nodes' logs go: `target/cluster-tests/`.
fn log_dir() -> PathBuf {
    let dir = profile_dir()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(std::env::temp_dir)
        .join("cluster-tests");
    std::fs::create_dir_all(&dir).expect("create the log dir");
    dir
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

/// One `presence-server` process. Dropping it kills the process (SIGKILL);
/// if the test is failing, the tail of the node's log is printed.
pub struct ServerNode {
    pub name: String,
    pub node_id: String,
    pub addr: SocketAddr,
    pub log: PathBuf,
    child: Option<Child>,
    status: Option<ExitStatus>,
}

impl ServerNode {
    /// Spawns a node and waits until it serves.
    pub async fn start(cluster: &RedisCluster, test: &str, name: &str) -> ServerNode {
        Self::start_at(cluster, test, name, None).await
    }

    /// Spawns a node listening on `addr` (a free port if `None`) and waits
    /// until it serves: a node restarted in place, the way a deploy replaces
    /// one behind a load balancer that lists fixed addresses.
    pub async fn start_at(
        cluster: &RedisCluster,
        test: &str,
        name: &str,
        addr: Option<SocketAddr>,
    ) -> ServerNode {
        Self::start_with(cluster, test, name, addr, &[]).await
    }

    /// Like [`start_at`](Self::start_at), with some of the test flags set to
    /// other values (`("--grace", "1s")`), or flags added.
    pub async fn start_with(
        cluster: &RedisCluster,
        test: &str,
        name: &str,
        addr: Option<SocketAddr>,
        overrides: &[(&str, String)],
    ) -> ServerNode {
        Self::start_with_env(cluster, test, name, addr, overrides, &[]).await
    }

    /// Like [`start_with`](Self::start_with), with environment variables
    /// set for the process (`("RUST_LOG", "debug")`).
    pub async fn start_with_env(
        cluster: &RedisCluster,
        test: &str,
        name: &str,
        addr: Option<SocketAddr>,
        overrides: &[(&str, String)],
        env: &[(&str, &str)],
    ) -> ServerNode {
        let mut args = server_args(&cluster.seeds());
        for (flag, value) in overrides {
            match args.iter().position(|arg| arg == flag) {
                Some(at) => args[at + 1] = value.clone(),
                None => args.extend([flag.to_string(), value.clone()]),
            }
        }
        let binary = server_binary();
        let node_id = format!("{test}-{name}-{:06x}", rand::random::<u32>() & 0xff_ffff);
        let log = log_dir().join(format!("{test}-{name}.log"));
        // A port taken between our probe and the server's bind makes the
        // server exit at once: then try another.
        for attempt in 1..=3 {
            let addr: SocketAddr = addr.unwrap_or_else(|| ([127, 0, 0, 1], free_port()).into());
            let file = File::create(&log).expect("create the node log");
            let mut command = Command::new(&binary);
            // The flags say everything; no PRESENCE_* variable of the caller's
            // environment (a Scylla, another listen address) leaks in.
            for (key, _) in std::env::vars() {
                if key.starts_with("PRESENCE_") {
                    command.env_remove(key);
                }
            }
            let child = command
                .envs(env.iter().copied())
                .args(["--listen", &addr.to_string(), "--node-id", &node_id])
                .args(&args)
                .stdin(Stdio::null())
                .stdout(file.try_clone().expect("clone the log file"))
                .stderr(file)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot spawn {}: {e}", binary.display()));
            let mut node = ServerNode {
                name: name.to_owned(),
                node_id: node_id.clone(),
                addr,
                log: log.clone(),
                child: Some(child),
                status: None,
            };
            match node.wait_ready().await {
                Ok(took) => {
                    println!(
                        "{name} ({node_id}) serving on {addr} after {took:?}, log {}",
                        log.display()
                    );
                    return node;
                }
                Err(why) => {
                    let text = std::fs::read_to_string(&log).unwrap_or_default();
                    if attempt < 3 && text.contains("cannot listen") {
                        continue;
                    }
                    panic!(
                        "{name} did not start: {why}\n--- {} ---\n{}",
                        log.display(),
                        tail(&text, 80)
                    );
                }
            }
        }
        unreachable!()
    }

    async fn wait_ready(&mut self) -> Result<Duration, String> {
        let started = Instant::now();
        while started.elapsed() < READY_WITHIN {
            if let Some(status) = self.try_wait() {
                return Err(format!("exited with {status}"));
            }
            if self.serving().await {
                return Ok(started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(format!("not serving within {READY_WITHIN:?}"))
    }

    /// Whether the node's health check says its presence service is serving.
    pub async fn serving(&self) -> bool {
        let check = async {
            let channel = tonic::transport::Channel::from_shared(self.url())
                .ok()?
                .connect()
                .await
                .ok()?;
            let mut health = HealthClient::new(channel);
            let request = HealthCheckRequest {
                service: "presence.v1.PresenceService".into(),
            };
            let response = health.check(request).await.ok()?.into_inner();
            Some(response.status == ServingStatus::Serving as i32)
        };
        tokio::time::timeout(Duration::from_secs(1), check)
            .await
            .ok()
            .flatten()
            .unwrap_or(false)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// kill -9: the node vanishes without draining.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            self.status = child.wait().ok();
        }
    }

    /// SIGTERM: the node drains and exits.
    pub fn terminate(&self) {
        let pid = self.pid().expect("the node is running");
        // SAFETY: kill(2) on our own child's pid, which we have not reaped.
        let sent = unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        assert_eq!(sent, 0, "SIGTERM to {pid} failed");
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        if let Some(status) = self.status {
            return Some(status);
        }
        let status = self.child.as_mut()?.try_wait().ok().flatten()?;
        self.status = Some(status);
        self.child = None;
        Some(status)
    }

    /// Waits for the process to exit, at most `within`.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if started.elapsed() >= within {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The node's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ServerNode {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- last lines of {} ({}, {}) ---\n{}",
                self.name,
                self.node_id,
                self.log.display(),
                tail(&self.log_text(), 60)
            );
        }
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Starts `names.len()` nodes at once.
pub async fn start_nodes(cluster: &RedisCluster, test: &str, names: &[&str]) -> Vec<ServerNode> {
    futures::future::join_all(
        names
            .iter()
            .map(|name| ServerNode::start(cluster, test, name)),
    )
    .await
}
