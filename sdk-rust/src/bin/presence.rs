//! `presence`: watch and set presence from a terminal, on top of the SDK.
//!
//! Thin on purpose: parse the arguments, make a client, call one SDK method,
//! print plain lines. Everything it can do, a service can do with the SDK.

use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use futures::StreamExt;
use presence_sdk::{
    Activity, ClientConfig, DEFAULT_ENDPOINT, OfflineReason, Platform, Presence, PresenceClient,
    PresenceUpdate, SessionOptions, SessionState, TlsConfig, UserStatus, VisibleStatus,
};

/// Watch and set online presence from a terminal.
#[derive(Debug, Parser)]
#[command(name = "presence", version)]
struct Cli {
    /// Server URL (`http://` or `https://`); several, comma-separated, are
    /// tried in turn on reconnect.
    #[arg(long, env = "PRESENCE_SERVER", default_value = DEFAULT_ENDPOINT, value_delimiter = ',', global = true)]
    server: Vec<String>,
    /// Bearer token, a JWT (`presence-server --dev token --user ID` mints
    /// one for a development server).
    #[arg(long, env = "PRESENCE_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// PEM file of the CA that `https://` servers' certificates must chain
    /// to, instead of the system's roots (a private CA at the gateway).
    #[arg(long, env = "PRESENCE_CA_CERT", value_name = "PEM", global = true)]
    ca_cert: Option<std::path::PathBuf>,
    /// PEM file of this client's certificate, for mutual TLS.
    #[arg(
        long,
        env = "PRESENCE_CLIENT_CERT",
        value_name = "PEM",
        requires = "client_key",
        global = true
    )]
    client_cert: Option<std::path::PathBuf>,
    /// PEM file of the key of `--client-cert`.
    #[arg(
        long,
        env = "PRESENCE_CLIENT_KEY",
        value_name = "PEM",
        requires = "client_cert",
        global = true
    )]
    client_key: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Be online as a device until Ctrl-C (which logs the device out),
    /// printing the session's state as it changes.
    Online {
        /// This device's id; the same id resumes the same session.
        #[arg(long)]
        device: String,
        /// The kind of device.
        #[arg(long, value_enum, default_value_t = PlatformArg::Desktop)]
        platform: PlatformArg,
        /// Also set the user's status when going online.
        #[arg(long, value_enum)]
        status: Option<StatusArg>,
        /// Custom message, set together with --status.
        #[arg(long, requires = "status")]
        message: Option<String>,
        /// Report this device as idle rather than active.
        #[arg(long)]
        idle: bool,
    },
    /// Print the presence of your contacts (or of --user, with an admin
    /// token) as it changes: time, user, status, message, last seen,
    /// version, offline reason.
    Watch {
        /// Watch this user instead of your contacts (admin); repeatable.
        #[arg(long = "user", value_name = "ID")]
        users: Vec<String>,
    },
    /// Print the presence of users.
    Get {
        #[arg(required = true, value_name = "ID")]
        ids: Vec<String>,
    },
    /// Set your status for all of your devices.
    Status {
        #[arg(value_enum)]
        status: StatusArg,
        /// Custom message; empty clears it.
        #[arg(long, default_value = "")]
        message: String,
    },
    /// Print a user's status changes, oldest first.
    History {
        #[arg(value_name = "ID")]
        id: String,
        /// How far back, e.g. 30m, 1h, 1day.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        since: Duration,
    },
    /// Manage contacts (add and remove need an admin token).
    Contacts {
        #[command(subcommand)]
        action: ContactsAction,
    },
}

#[derive(Debug, Subcommand)]
enum ContactsAction {
    /// Link USER with each of IDS, both ways.
    Add {
        user: String,
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Remove the links between USER and each of IDS.
    Remove {
        user: String,
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// List USER's contacts (yours if omitted).
    List { user: Option<String> },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum PlatformArg {
    Web,
    Ios,
    Android,
    Desktop,
    Service,
}

impl From<PlatformArg> for Platform {
    fn from(arg: PlatformArg) -> Self {
        match arg {
            PlatformArg::Web => Platform::Web,
            PlatformArg::Ios => Platform::Ios,
            PlatformArg::Android => Platform::Android,
            PlatformArg::Desktop => Platform::Desktop,
            PlatformArg::Service => Platform::Service,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum StatusArg {
    Online,
    Busy,
    Invisible,
}

impl From<StatusArg> for UserStatus {
    fn from(arg: StatusArg) -> Self {
        match arg {
            StatusArg::Online => UserStatus::Online,
            StatusArg::Busy => UserStatus::Busy,
            StatusArg::Invisible => UserStatus::Invisible,
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The contents of an optional PEM file named by a flag.
fn read_pem(flag: &str, path: Option<&std::path::Path>) -> anyhow::Result<Option<String>> {
    path.map(|path| {
        std::fs::read_to_string(path).with_context(|| format!("{flag} {}", path.display()))
    })
    .transpose()
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let tls = TlsConfig {
        ca_cert_pem: read_pem("--ca-cert", cli.ca_cert.as_deref())?,
        client_cert_pem: read_pem("--client-cert", cli.client_cert.as_deref())?,
        client_key_pem: read_pem("--client-key", cli.client_key.as_deref())?,
        domain_name: None,
    };
    let mut config = ClientConfig {
        endpoints: cli.server,
        token: cli.token,
        tls,
        ..ClientConfig::default()
    };
    if let Command::Online {
        device, platform, ..
    } = &cli.command
    {
        config.device_id = device.clone();
        config.platform = (*platform).into();
    }
    let client = PresenceClient::connect(config).await?;

    match cli.command {
        Command::Online {
            status,
            message,
            idle,
            ..
        } => {
            let options = SessionOptions {
                activity: if idle {
                    Activity::Idle
                } else {
                    Activity::Active
                },
                status: status.map_or(UserStatus::Unspecified, Into::into),
                custom_message: message.unwrap_or_default(),
            };
            online(&client, options).await
        }
        Command::Watch { users } => watch(&client, users).await,
        Command::Get { ids } => {
            for presence in client.get_presence(&ids).await? {
                println!("{}", presence_line(&presence));
                for device in &presence.devices {
                    println!(
                        "    device {} {} {} since {}",
                        device.device_id,
                        name(device.platform().as_str_name(), "PLATFORM_"),
                        name(device.activity().as_str_name(), "ACTIVITY_"),
                        format_time(device.connected_since_unix_ms),
                    );
                }
            }
            Ok(())
        }
        Command::Status { status, message } => {
            match client.set_status(status.into(), message).await? {
                Some(presence) => println!("{}", presence_line(&presence)),
                None => println!("status set"),
            }
            Ok(())
        }
        Command::History { id, since } => {
            let from = SystemTime::now().checked_sub(since).unwrap_or(UNIX_EPOCH);
            let mut entries = std::pin::pin!(client.get_history(&id, Some(from), None));
            let mut count = 0usize;
            while let Some(entry) = entries.next().await {
                let entry = entry?;
                count += 1;
                println!(
                    "{}  {:<8} {:<20} v{} {}",
                    format_time(entry.at_unix_ms),
                    status_name(entry.status()),
                    quoted(&entry.custom_message),
                    entry.version,
                    reason_name(entry.offline_reason()),
                );
            }
            if count == 0 {
                println!(
                    "no changes in the last {}",
                    humantime::format_duration(since)
                );
            }
            Ok(())
        }
        Command::Contacts { action } => match action {
            ContactsAction::Add { user, ids } => {
                let added = client.add_contacts(&user, &ids).await?;
                println!("added {added} contact link(s) for {user}");
                Ok(())
            }
            ContactsAction::Remove { user, ids } => {
                let removed = client.remove_contacts(&user, &ids).await?;
                println!("removed {removed} contact link(s) for {user}");
                Ok(())
            }
            ContactsAction::List { user } => {
                for id in client.list_contacts(user.as_deref()).await? {
                    println!("{id}");
                }
                Ok(())
            }
        },
    }
}

/// Holds a session until Ctrl-C, then logs the device out.
async fn online(client: &PresenceClient, options: SessionOptions) -> anyhow::Result<()> {
    let mut state = client.session_state();
    client
        .start_session(options)
        .await
        .context("could not go online")?;
    print_state(&state.borrow_and_update());
    println!("press Ctrl-C to go offline");
    loop {
        tokio::select! {
            signal = tokio::signal::ctrl_c() => {
                signal.context("could not listen for Ctrl-C")?;
                break;
            }
            changed = state.changed() => {
                if changed.is_err() {
                    break;
                }
                let current = state.borrow_and_update().clone();
                print_state(&current);
                if let SessionState::Closed { error: Some(error) } = current {
                    return Err(error.into());
                }
            }
        }
    }
    client.end_session().await.context("could not log out")?;
    println!("{}  offline (logged out)", now());
    Ok(())
}

fn print_state(state: &SessionState) {
    let line = match state {
        SessionState::Idle => return,
        SessionState::Connecting => "connecting".to_owned(),
        SessionState::Connected {
            endpoint,
            heartbeat_interval,
            lease,
        } => format!(
            "online via {endpoint} (beat every {}, lease {})",
            humantime::format_duration(*heartbeat_interval),
            humantime::format_duration(*lease),
        ),
        SessionState::Reconnecting { attempt, reason } => {
            format!("reconnecting (attempt {attempt}): {reason}")
        }
        SessionState::Closed { error: None } => "session closed".to_owned(),
        SessionState::Closed { error: Some(error) } => format!("session closed: {error}"),
    };
    println!("{}  {line}", now());
}

async fn watch(client: &PresenceClient, users: Vec<String>) -> anyhow::Result<()> {
    let mut updates = client.watch_users(users);
    while let Some(update) = updates.next().await {
        let line = match update? {
            PresenceUpdate::Presence(presence) => presence_line(&presence),
            PresenceUpdate::SnapshotComplete { watched } => {
                format!("-- snapshot complete, watching {watched}")
            }
            PresenceUpdate::ContactRemoved { user_id } => {
                format!("{user_id:<16} removed from contacts")
            }
            PresenceUpdate::Reconnecting { attempt, reason } => {
                format!("-- reconnecting (attempt {attempt}): {reason}")
            }
            PresenceUpdate::Resumed { watched } => format!("-- resumed, watching {watched}"),
        };
        println!("{}  {line}", now());
    }
    Ok(())
}

/// `alice            busy     "in a meeting"       seen just now    v12  -`
fn presence_line(p: &Presence) -> String {
    format!(
        "{:<16} {:<8} {:<20} seen {:<12} v{} {}",
        p.user_id,
        status_name(p.status()),
        quoted(&p.custom_message),
        last_seen(p.last_seen_unix_ms),
        p.version,
        reason_name(p.offline_reason()),
    )
}

/// `PLATFORM_DESKTOP` with prefix `PLATFORM_` → `desktop`.
fn name(proto_name: &str, prefix: &str) -> String {
    proto_name
        .strip_prefix(prefix)
        .unwrap_or(proto_name)
        .to_lowercase()
        .replace('_', " ")
}

fn status_name(status: VisibleStatus) -> String {
    match status {
        VisibleStatus::Unspecified => "unknown".to_owned(),
        status => name(status.as_str_name(), "VISIBLE_STATUS_"),
    }
}

fn reason_name(reason: OfflineReason) -> String {
    match reason {
        OfflineReason::Unspecified => "-".to_owned(),
        reason => name(reason.as_str_name(), "OFFLINE_REASON_"),
    }
}

fn quoted(message: &str) -> String {
    if message.is_empty() {
        "-".to_owned()
    } else {
        format!("{message:?}")
    }
}

fn now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

fn from_unix_ms(ms: i64) -> Option<SystemTime> {
    let ms = u64::try_from(ms).ok().filter(|&ms| ms > 0)?;
    UNIX_EPOCH.checked_add(Duration::from_millis(ms))
}

fn format_time(ms: i64) -> String {
    from_unix_ms(ms).map_or_else(
        || "-".to_owned(),
        |t| humantime::format_rfc3339_seconds(t).to_string(),
    )
}

/// "never", "just now", "5m ago", or the date for anything older than a day.
fn last_seen(ms: i64) -> String {
    let Some(at) = from_unix_ms(ms) else {
        return "never".to_owned();
    };
    let Ok(ago) = SystemTime::now().duration_since(at) else {
        return "just now".to_owned();
    };
    match ago.as_secs() {
        0..5 => "just now".to_owned(),
        s @ 5..60 => format!("{s}s ago"),
        s @ 60..3600 => format!("{}m ago", s / 60),
        s @ 3600..86400 => format!("{}h ago", s / 3600),
        _ => format_time(ms),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn names_are_short_and_lowercase() {
        assert_eq!(status_name(VisibleStatus::Online), "online");
        assert_eq!(reason_name(OfflineReason::LeaseExpired), "lease expired");
        assert_eq!(reason_name(OfflineReason::Unspecified), "-");
        assert_eq!(
            name(Platform::Desktop.as_str_name(), "PLATFORM_"),
            "desktop"
        );
    }

    #[test]
    fn last_seen_reads_like_a_person_would_say_it() {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        assert_eq!(last_seen(0), "never");
        assert_eq!(last_seen(now_ms), "just now");
        assert_eq!(last_seen(now_ms - 90_000), "1m ago");
        assert_eq!(last_seen(now_ms - 2 * 3_600_000), "2h ago");
        assert!(last_seen(now_ms - 3 * 86_400_000).ends_with('Z'));
    }

    #[test]
    fn global_flags_work_after_the_subcommand_and_servers_split_on_commas() {
        let cli = Cli::try_parse_from([
            "presence",
            "get",
            "alice",
            "--server",
            "http://a:1,http://b:2",
        ])
        .unwrap();
        assert_eq!(cli.server, ["http://a:1", "http://b:2"]);
        assert!(
            Cli::try_parse_from(["presence", "online", "--device", "d", "--message", "hi"])
                .is_err()
        );
    }
}
