//! What the server's test binaries share.

/// The comma-separated addresses a test environment variable names (e.g.
/// `PRESENCE_TEST_REDIS_CLUSTER`). Unset: a note and `None` (the case passes
/// without running), unless `PRESENCE_REQUIRE_BACKENDS=1`, which makes it a
/// failure.
pub fn backend_from_env(var: &str) -> Option<Vec<String>> {
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
    assert!(
        std::env::var("PRESENCE_REQUIRE_BACKENDS").as_deref() != Ok("1"),
        "PRESENCE_REQUIRE_BACKENDS=1 but {var} is unset"
    );
    eprintln!("note: {var} is unset; skipping");
    None
}
