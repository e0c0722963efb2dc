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
    Activity, ChangeEvent, ClientConfig, ConsumeOptions, DEFAULT_ENDPOINT, FeedStart, FeedUpdate,
    OfflineReason, Platform, Presence, PresenceClient, PresenceUpdate, SessionOptions,
    SessionState, TlsConfig, UserStatus, VisibleStatus,
};

/// Watch and set online presence from a terminal.
#[derive(Debug, Parser)]
#[command(name = "presence", version)]
struct Cli {
    /// Server URL (`http://` or `https://`); several, comma-separated, are
    /// tried in turn on reconnect.
    #[arg(long, env = "PRESENCE_SERVER", default_value = DEFAULT_ENDPOINT, value_delimiter = ',', global = true)]
    server: Vec<String>,
    /// Bearer token, a JWT (`presence-server --dev token --user ID
    /// [--admin]` mints one for a development server; `feed` and contacts
    /// changes need `--admin`).
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
    /// Read the change feed (admin token): every change of what contacts
    /// see, one line each: time logged, partition, offset, user, status,
    /// version, chosen status.
    Feed {
        #[command(subcommand)]
        action: FeedAction,
    },
}

#[derive(Debug, Subcommand)]
enum FeedAction {
    /// Print changes as they are logged, until Ctrl-C.
    Tail {
        /// Start this far back (e.g. 10m, 1h) instead of now.
        #[arg(long, value_parser = humantime::parse_duration)]
        since: Option<Duration>,
    },
    /// Join a consumer group and print its share of the changes,
    /// acknowledging each batch once printed, until Ctrl-C. Reconnects by
    /// itself; a change may be printed twice (same version) after a
    /// reconnect.
    Consume {
        /// The group: its members share the changes, other groups get their
        /// own copy.
        #[arg(long)]
        group: String,
        /// This member's name in the group (default: the server picks one).
        #[arg(long)]
        consumer: Option<String>,
        /// Where a new group starts: latest, oldest, or a duration ago
        /// (e.g. 10m). A group that exists keeps its position.
        #[arg(long, default_value = "latest", value_parser = parse_feed_start)]
        from: FeedStart,
        /// Most changes per batch (1 to 1000; default: the server's, 100).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1000))]
        max_batch: Option<u32>,
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
        Command::Feed { action } => until_ctrl_c(feed(&client, action)).await,
    }
}

/// Runs `work` until it ends or Ctrl-C.
async fn until_ctrl_c(work: impl Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tokio::select! {
        result = work => result,
        signal = tokio::signal::ctrl_c() => signal.context("could not listen for Ctrl-C"),
    }
}

async fn feed(client: &PresenceClient, action: FeedAction) -> anyhow::Result<()> {
    match action {
        FeedAction::Tail { since } => {
            let from = since.map(|ago| SystemTime::now().checked_sub(ago).unwrap_or(UNIX_EPOCH));
            let mut events = std::pin::pin!(client.tail(from).await?);
            while let Some(event) = events.next().await {
                println!("{}", change_line(&event?));
            }
            Ok(())
        }
        FeedAction::Consume {
            group,
            consumer,
            from,
            max_batch,
        } => {
            let options = ConsumeOptions {
                consumer: consumer.unwrap_or_default(),
                start: from,
                max_batch: max_batch.unwrap_or(0),
                ..ConsumeOptions::new(group)
            };
            let mut consumer = client
                .consume(options)
                .await
                .context("could not join the group")?;
            while let Some(update) = consumer.next().await {
                match update? {
                    FeedUpdate::Batch(batch) => {
                        for event in &batch.events {
                            println!("{}", change_line(event));
                        }
                        consumer.ack(&batch).await;
                    }
                    FeedUpdate::Assigned(assigned) => println!(
                        "-- reading partitions {:?} of {}, {} member(s)",
                        assigned.partitions, assigned.partition_count, assigned.members
                    ),
                    FeedUpdate::Reconnecting { attempt, reason } => {
                        println!("-- reconnecting (attempt {attempt}): {reason}");
                    }
                }
            }
            Ok(())
        }
    }
}

/// `--from`: `latest`, `oldest`, or how long ago.
fn parse_feed_start(value: &str) -> Result<FeedStart, String> {
    match value {
        "latest" => Ok(FeedStart::Latest),
        "oldest" => Ok(FeedStart::Oldest),
        ago => {
            let ago = humantime::parse_duration(ago)
                .map_err(|e| format!("expected latest, oldest or a duration like 10m: {e}"))?;
            Ok(FeedStart::At(
                SystemTime::now().checked_sub(ago).unwrap_or(UNIX_EPOCH),
            ))
        }
    }
}

/// `2025-11-30T14:02:11Z  p3   1764511331000-0    bob              busy     v1764511331000123 chose busy`
fn change_line(event: &ChangeEvent) -> String {
    let logged_ms = event
        .offset
        .split_once('-')
        .and_then(|(ms, _)| ms.parse().ok())
        .unwrap_or(0);
    let presence = event.presence.clone().unwrap_or_default();
    format!(
        "{}  p{:<3} {:<18} {:<16} {:<8} v{} chose {}",
        format_time(logged_ms),
        event.partition,
        event.offset,
        presence.user_id,
        status_name(presence.status()),
        presence.version,
        chosen_name(presence.chosen_status()),
    )
}

fn chosen_name(status: UserStatus) -> String {
    match status {
        UserStatus::Unspecified => "-".to_owned(),
        status => name(status.as_str_name(), "USER_STATUS_"),
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

    #[test]
    fn feed_start_is_latest_oldest_or_a_duration_ago() {
        assert_eq!(parse_feed_start("latest"), Ok(FeedStart::Latest));
        assert_eq!(parse_feed_start("oldest"), Ok(FeedStart::Oldest));
        let Ok(FeedStart::At(at)) = parse_feed_start("10m") else {
            panic!("10m is a time");
        };
        let ago = SystemTime::now().duration_since(at).unwrap();
        assert!((Duration::from_secs(599)..Duration::from_secs(601)).contains(&ago));
        assert!(parse_feed_start("yesterday").is_err());
        let cli = Cli::try_parse_from(["presence", "feed", "consume", "--group", "g"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Feed {
                action: FeedAction::Consume {
                    from: FeedStart::Latest,
                    max_batch: None,
                    ..
                }
            }
        ));
        assert!(Cli::try_parse_from(["presence", "feed", "consume"]).is_err());
        assert!(
            Cli::try_parse_from([
                "presence",
                "feed",
                "consume",
                "--group",
                "g",
                "--max-batch",
                "0"
            ])
            .is_err()
        );
    }

    #[test]
    fn a_change_line_shows_when_where_who_and_what() {
        let event = ChangeEvent {
            presence: Some(Presence {
                user_id: "bob".into(),
                status: VisibleStatus::Busy as i32,
                version: 42,
                chosen_status: UserStatus::Busy as i32,
                ..Presence::default()
            }),
            partition: 3,
            offset: "1764511331000-2".into(),
        };
        let line = change_line(&event);
        assert!(line.starts_with("2025-11-30T14:02:11Z  p3 "), "{line}");
        for part in ["1764511331000-2", "bob", "busy", "v42", "chose busy"] {
            assert!(line.contains(part), "{part} missing in {line}");
        }
    }
}
