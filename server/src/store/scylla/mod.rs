//! The durable store on ScyllaDB, or any CQL server (tests use Apache
//! Cassandra): contacts ([`ScyllaContactStore`]), presence history and the
//! latest presence per user ([`ScyllaHistoryStore`]).
//!
//! The schema and every query are `.cql` files beside this one, loaded with
//! `include_str!`: `schema.cql` (applied idempotently by [`connect`] and
//! [`migrate`]), `retention.cql` (applied when the configured retention
//! changed), `contacts.cql` and `history.cql` (named statements, prepared once
//! per session).
//!
//! The stores answer every driver error with [`StoreError::Unavailable`] and
//! its cause. Requests have a short client-side timeout
//! ([`ScyllaConfig::request_timeout`]) so that a hung node (not only a dead
//! one) turns into an error quickly: the node's history buffer
//! ([`crate::store::buffered`]) then keeps the records and retries.

mod contacts;
mod history;

use std::collections::HashMap;
use std::fmt::Display;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::policies::timestamp_generator::MonotonicTimestampGenerator;
use scylla::statement::prepared::PreparedStatement;

pub use self::contacts::ScyllaContactStore;
pub use self::history::ScyllaHistoryStore;
use super::{ContactStore, HistoryStore, StoreError};

const SCHEMA: &str = include_str!("schema.cql");
const RETENTION: &str = include_str!("retention.cql");
const CHOICE_COLUMNS: &str = include_str!("choice_columns.cql");

/// The default keyspace.
pub const DEFAULT_KEYSPACE: &str = "presence";

/// The default replication: one copy, for development and tests. Production
/// creates the keyspace with NetworkTopologyStrategy beforehand (see
/// `schema.cql`), or passes such a map in [`ScyllaConfig::replication`].
pub const DEV_REPLICATION: &str = "{'class': 'SimpleStrategy', 'replication_factor': 1}";

/// The longest TTL a CQL server accepts (20 years).
const MAX_TTL_SECONDS: u64 = 630_720_000;

/// How to reach the durable store and what schema to keep there.
#[derive(Clone, Debug)]
pub struct ScyllaConfig {
    /// Contact points, `host:port`; the driver discovers the other nodes.
    pub nodes: Vec<String>,
    /// Lowercase letters, digits and `_`, starting with a letter.
    pub keyspace: String,
    /// How long history rows live: the history table's default TTL.
    pub retention: Duration,
    /// The keyspace's replication map, used only if the keyspace does not
    /// exist yet. Default [`DEV_REPLICATION`].
    pub replication: String,
    /// Client-side limit on one request, retries included (the driver's own
    /// default is 30 s). Short, so that a hung node turns into an error the
    /// history writer retries, instead of a write stuck for half a minute.
    /// Default 2 s.
    pub request_timeout: Duration,
    /// Limit on opening one connection (TCP and CQL handshake). Default 2 s.
    pub connect_timeout: Duration,
}

impl ScyllaConfig {
    /// The defaults for everything but the contact points, keyspace and
    /// retention.
    pub fn new(nodes: &[String], keyspace: &str, retention: Duration) -> Self {
        ScyllaConfig {
            nodes: nodes.to_vec(),
            keyspace: keyspace.to_owned(),
            retention,
            replication: DEV_REPLICATION.to_owned(),
            request_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(2),
        }
    }
}

/// The durable backends, sharing one session.
pub struct ScyllaBackends {
    /// The driver session: one connection pool per node, reconnecting by
    /// itself when a node comes back.
    pub session: Arc<Session>,
    /// A [`ScyllaContactStore`].
    pub contacts: Arc<dyn ContactStore>,
    /// A [`ScyllaHistoryStore`], unbuffered: a node puts it behind a
    /// [`crate::store::buffered::BufferedHistory`].
    pub history: Arc<dyn HistoryStore>,
}

/// Connects with the default timeouts and replication, applies the schema and
/// prepares every query. Fails if no contact point answers within the connect
/// timeout.
pub async fn connect(
    nodes: &[String],
    keyspace: &str,
    retention: Duration,
) -> anyhow::Result<ScyllaBackends> {
    connect_with(&ScyllaConfig::new(nodes, keyspace, retention)).await
}

/// [`connect`] with every option.
pub async fn connect_with(config: &ScyllaConfig) -> anyhow::Result<ScyllaBackends> {
    let session = Arc::new(open_session(config).await?);
    apply_schema(&session, config).await?;
    let contacts = ScyllaContactStore::prepare(session.clone(), &config.keyspace).await?;
    let history = ScyllaHistoryStore::prepare(session.clone(), &config.keyspace).await?;
    Ok(ScyllaBackends {
        session,
        contacts: Arc::new(contacts),
        history: Arc::new(history),
    })
}

/// Creates the keyspace and tables if missing and brings the history TTL to
/// `retention`; what `presence-server migrate` runs. Idempotent.
pub async fn migrate(nodes: &[String], keyspace: &str, retention: Duration) -> anyhow::Result<()> {
    migrate_with(&ScyllaConfig::new(nodes, keyspace, retention)).await
}

/// [`migrate`] with every option.
pub async fn migrate_with(config: &ScyllaConfig) -> anyhow::Result<()> {
    let session = open_session(config).await?;
    apply_schema(&session, config).await
}

async fn open_session(config: &ScyllaConfig) -> anyhow::Result<Session> {
    anyhow::ensure!(!config.nodes.is_empty(), "no CQL contact points given");
    let profile = ExecutionProfile::builder()
        .request_timeout(Some(config.request_timeout))
        .build();
    SessionBuilder::new()
        .known_nodes(&config.nodes)
        .connection_timeout(config.connect_timeout)
        .default_execution_profile_handle(profile.into_handle())
        // Keepalives find a hung connection (a paused node keeps its TCP
        // socket open) within 15 s instead of the driver's 60, so the pool
        // reconnects soon after the node answers again.
        .keepalive_interval(Duration::from_secs(5))
        .keepalive_timeout(Duration::from_secs(10))
        // Client-side timestamps, increasing within this process: a contact
        // removed right after being added stays removed even if the two
        // writes reach coordinators whose clocks disagree. Statements with
        // their own USING TIMESTAMP (presence_current) keep theirs.
        .timestamp_generator(Arc::new(MonotonicTimestampGenerator::new()))
        .build()
        .await
        .with_context(|| format!("cannot connect to CQL nodes {}", config.nodes.join(",")))
}

/// Values substituted into the `.cql` files, validated so that nothing from
/// the configuration can change a statement's meaning.
struct Placeholders {
    keyspace: String,
    replication: String,
    ttl_seconds: u64,
    window_minutes: u64,
}

impl Placeholders {
    fn of(config: &ScyllaConfig) -> anyhow::Result<Self> {
        validate_keyspace(&config.keyspace)?;
        let replication = config.replication.trim();
        anyhow::ensure!(
            replication.starts_with('{')
                && replication.ends_with('}')
                && !replication.contains(';'),
            "replication must be one CQL map, e.g. {DEV_REPLICATION}"
        );
        let ttl_seconds = config.retention.as_secs();
        anyhow::ensure!(
            (1..=MAX_TTL_SECONDS).contains(&ttl_seconds),
            "history retention must be between 1 s and 20 years"
        );
        Ok(Placeholders {
            keyspace: config.keyspace.clone(),
            replication: replication.to_owned(),
            ttl_seconds,
            // About 24 windows per retention, as TWCS recommends (20 to 30).
            window_minutes: (ttl_seconds / 60 / 24).max(1),
        })
    }

    fn fill(&self, cql: &str) -> String {
        cql.replace("{keyspace}", &self.keyspace)
            .replace("{replication}", &self.replication)
            .replace("{ttl_seconds}", &self.ttl_seconds.to_string())
            .replace("{window_minutes}", &self.window_minutes.to_string())
    }
}

fn validate_keyspace(keyspace: &str) -> anyhow::Result<()> {
    let mut chars = keyspace.chars();
    let valid = keyspace.len() <= 48
        && chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    anyhow::ensure!(
        valid,
        "keyspace {keyspace:?} must be 1 to 48 lowercase letters, digits or _, starting with a letter"
    );
    Ok(())
}

/// The statements of a `.cql` file: comment lines dropped, split at `;`.
fn statements(cql: &str) -> Vec<String> {
    let text: String = cql
        .lines()
        .filter(|line| !line.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n");
    text.split(';')
        .map(str::trim)
        .filter(|statement| !statement.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The statements of a query file, by the name on their `-- name: NAME`
/// line.
fn named_statements(cql: &str) -> HashMap<String, String> {
    let mut named = HashMap::new();
    let mut current: Option<(String, Vec<&str>)> = None;
    let mut finish = |current: Option<(String, Vec<&str>)>| {
        if let Some((name, lines)) = current {
            named.insert(name, statements(&lines.join("\n")).concat());
        }
    };
    for line in cql.lines() {
        if let Some(name) = line.trim_start().strip_prefix("-- name:") {
            finish(current.take());
            current = Some((name.trim().to_owned(), Vec::new()));
        } else if let Some((_, lines)) = current.as_mut() {
            lines.push(line);
        }
    }
    finish(current);
    named
}

async fn apply_schema(session: &Session, config: &ScyllaConfig) -> anyhow::Result<()> {
    let values = Placeholders::of(config)?;
    run_statements(session, SCHEMA, &values).await?;
    add_choice_columns(session, config, &values).await?;

    // CREATE ... IF NOT EXISTS keeps an existing table as it is: bring its TTL
    // to the configured retention when that changed.
    let (ttl,): (i32,) = session
        .query_unpaged(
            "SELECT default_time_to_live FROM system_schema.tables \
             WHERE keyspace_name = ? AND table_name = 'presence_history'",
            (config.keyspace.as_str(),),
        )
        .await
        .context("reading the history table's TTL")?
        .into_rows_result()?
        .single_row()
        .context("reading the history table's TTL")?;
    if u64::try_from(ttl).ok() != Some(values.ttl_seconds) {
        tracing::info!(
            keyspace = config.keyspace,
            from_seconds = ttl,
            to_seconds = values.ttl_seconds,
            "history retention changed; altering the history table's TTL"
        );
        run_statements(session, RETENTION, &values).await?;
    }
    Ok(())
}

/// Gives a `presence_current` table created before the choice columns
/// existed the ones it lacks. Idempotent; a column another node added in the
/// meantime is taken as added.
async fn add_choice_columns(
    session: &Session,
    config: &ScyllaConfig,
    values: &Placeholders,
) -> anyhow::Result<()> {
    let missing = missing_choice_columns(session, config).await?;
    if missing.is_empty() {
        return Ok(());
    }
    tracing::info!(
        keyspace = config.keyspace,
        columns = ?missing,
        "adding the choice columns to presence_current"
    );
    let statements = named_statements(CHOICE_COLUMNS);
    for column in &missing {
        let statement = values.fill(&statements[column]);
        if let Err(error) = session.query_unpaged(statement.as_str(), ()).await
            && missing_choice_columns(session, config)
                .await?
                .contains(column)
        {
            return Err(error).with_context(|| format!("applying schema statement: {statement}"));
        }
    }
    Ok(())
}

/// The columns of `choice_columns.cql` that `presence_current` lacks.
async fn missing_choice_columns(
    session: &Session,
    config: &ScyllaConfig,
) -> anyhow::Result<Vec<String>> {
    let result = session
        .query_unpaged(
            "SELECT column_name FROM system_schema.columns \
             WHERE keyspace_name = ? AND table_name = 'presence_current'",
            (config.keyspace.as_str(),),
        )
        .await
        .context("reading presence_current's columns")?
        .into_rows_result()?;
    let mut present = Vec::new();
    for row in result.rows::<(String,)>()? {
        present.push(row?.0);
    }
    let mut missing: Vec<String> = named_statements(CHOICE_COLUMNS)
        .into_keys()
        .filter(|column| !present.contains(column))
        .collect();
    missing.sort();
    Ok(missing)
}

/// Runs the statements of a schema file in order, placeholders filled in.
async fn run_statements(
    session: &Session,
    file: &str,
    values: &Placeholders,
) -> anyhow::Result<()> {
    for statement in statements(file) {
        let statement = values.fill(&statement);
        // The driver waits for schema agreement after each schema change, so
        // the next statement (and the prepares after this) see the tables.
        session
            .query_unpaged(statement.as_str(), ())
            .await
            .with_context(|| format!("applying schema statement: {statement}"))?;
    }
    Ok(())
}

/// Prepares every statement of a query file, by name. Missing names are a
/// programming error found by the first test that connects.
struct Queries {
    session: Arc<Session>,
    keyspace: String,
    named: HashMap<String, String>,
}

impl Queries {
    fn new(session: Arc<Session>, keyspace: &str, file: &str) -> anyhow::Result<Self> {
        validate_keyspace(keyspace)?;
        Ok(Queries {
            session,
            keyspace: keyspace.to_owned(),
            named: named_statements(file),
        })
    }

    /// Prepares the named statement. All our statements are idempotent
    /// (plain inserts and deletes of fixed values, reads), which lets the
    /// driver's retry policy retry them after a timeout.
    async fn prepare(&self, name: &str) -> anyhow::Result<PreparedStatement> {
        let cql = self
            .named
            .get(name)
            .with_context(|| format!("no query named {name}"))?
            .replace("{keyspace}", &self.keyspace);
        let mut prepared = self
            .session
            .prepare(cql.as_str())
            .await
            .with_context(|| format!("preparing {cql}"))?;
        prepared.set_is_idempotent(true);
        Ok(prepared)
    }
}

/// Maps a driver error to [`StoreError::Unavailable`], naming what failed.
fn unavailable<E: Display>(what: &'static str) -> impl FnOnce(E) -> StoreError {
    move |error| StoreError::Unavailable(format!("scylla {what}: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_splits_into_its_statements() {
        let schema = statements(SCHEMA);
        assert_eq!(schema.len(), 4, "{schema:#?}");
        assert!(schema[0].starts_with("CREATE KEYSPACE IF NOT EXISTS {keyspace}"));
        assert!(schema.iter().all(|s| !s.contains("--")));
    }

    #[test]
    fn query_files_name_every_statement() {
        let history = named_statements(include_str!("history.cql"));
        let mut names: Vec<_> = history.keys().map(String::as_str).collect();
        names.sort();
        assert_eq!(
            names,
            ["current", "insert", "page", "save_choice", "upsert_current"]
        );
        assert!(history["upsert_current"].ends_with("USING TIMESTAMP ?"));
        assert!(history["save_choice"].ends_with("USING TIMESTAMP ?"));
        let columns = named_statements(CHOICE_COLUMNS);
        assert_eq!(columns.len(), 3);
        for (column, statement) in &columns {
            assert!(
                statements(SCHEMA)[3].contains(&format!("{column} ")),
                "{column}"
            );
            assert!(statement.starts_with("ALTER TABLE {keyspace}.presence_current ADD"));
        }
        let contacts = named_statements(include_str!("contacts.cql"));
        assert_eq!(contacts.len(), 5);
        assert!(
            contacts
                .values()
                .all(|s| !s.contains(';') && !s.contains("--"))
        );
    }

    #[test]
    fn placeholders_are_validated_and_filled() {
        let nodes = ["127.0.0.1:9042".to_owned()];
        let day = Duration::from_secs(24 * 3600);
        let values = Placeholders::of(&ScyllaConfig::new(&nodes, "presence", day)).unwrap();
        let filled = values.fill(&statements(SCHEMA)[2]);
        assert!(filled.contains("default_time_to_live = 86400"));
        assert!(filled.contains("'compaction_window_size': '60'"));
        assert!(filled.contains("presence.presence_history"));
        for bad in ["", "Presence", "1abc", "a;b", "a b", "ks\"x"] {
            assert!(
                Placeholders::of(&ScyllaConfig::new(&nodes, bad, day)).is_err(),
                "{bad}"
            );
        }
        assert!(Placeholders::of(&ScyllaConfig::new(&nodes, "p", Duration::ZERO)).is_err());
        let mut config = ScyllaConfig::new(&nodes, "p", day);
        config.replication = "{'class': 'SimpleStrategy'}; DROP KEYSPACE x".into();
        assert!(Placeholders::of(&config).is_err());
    }
}
