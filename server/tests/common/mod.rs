//! The PostgreSQL server the store tests use: $EDGETUNE_POSTGRES_URL (.ci/run starts
//! Debian's postgresql and sets it). Without it the tests skip with a message, except
//! under CI=true, where they fail.

/// The database URL, or None (with a message) when there is none outside CI.
pub fn postgres_url() -> Option<String> {
    match std::env::var("EDGETUNE_POSTGRES_URL") {
        Ok(u) if !u.is_empty() => Some(u),
        _ if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("EDGETUNE_POSTGRES_URL is not set; .ci/run starts PostgreSQL and sets it")
        }
        _ => {
            eprintln!("skipped: no PostgreSQL (set EDGETUNE_POSTGRES_URL)");
            None
        }
    }
}

/// A schema name no other test run uses, dropped first if it exists.
pub fn fresh_schema(url: &str, name: &str) -> String {
    let schema = format!("t{}_{name}", std::process::id());
    let mut c = postgres::Client::connect(url, postgres::NoTls).unwrap();
    c.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .unwrap();
    schema
}
