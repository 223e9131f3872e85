//! Real PostgreSQL for tests: each test gets a database of its own, created on the server named
//! by `FINX_TEST_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`) and
//! dropped when the test ends. A test that cannot reach the server fails loudly; it never skips.

use std::time::Duration;

use rand::distr::{Alphanumeric, SampleString};
use sqlx::{AssertSqlSafe, Connection, PgConnection};

/// The server the tests use.
pub fn admin_url() -> String {
    std::env::var("FINX_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A database that exists for one test.
pub struct TestDatabase {
    pub name: String,
    pub url: String,
}

impl TestDatabase {
    pub fn create() -> Self {
        let name = format!(
            "finx_test_{}",
            Alphanumeric
                .sample_string(&mut rand::rng(), 12)
                .to_lowercase()
        );
        let admin = admin_url();
        if let Err(e) = run_sql(&admin, &format!("CREATE DATABASE {name}")) {
            panic!(
                "this test needs PostgreSQL at FINX_TEST_DATABASE_URL (or the default \
                 postgres://postgres@127.0.0.1:5432/postgres) and could not create a database \
                 there: {e}"
            );
        }
        let mut url = url::Url::parse(&admin).expect("FINX_TEST_DATABASE_URL is a URL");
        url.set_path(&format!("/{name}"));
        Self {
            name,
            url: url.to_string(),
        }
    }

    /// Runs `sql` in this database.
    pub fn execute(&self, sql: &str) {
        run_sql(&self.url, sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// The first column of the first row of `sql`, as text.
    pub fn query_text(&self, sql: &str) -> Option<String> {
        let (url, sql) = (self.url.clone(), sql.to_owned());
        on_own_runtime(async move {
            let mut conn = PgConnection::connect(&url).await?;
            let value: Option<String> = sqlx::query_scalar(AssertSqlSafe(sql))
                .fetch_optional(&mut conn)
                .await?
                .flatten();
            conn.close().await?;
            Ok(value)
        })
        .expect("query")
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let _ = run_sql(
            &admin_url(),
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}

/// Runs one statement on a connection of its own, from any thread or runtime.
pub fn run_sql(url: &str, sql: &str) -> Result<(), sqlx::Error> {
    let (url, sql) = (url.to_owned(), sql.to_owned());
    on_own_runtime(async move {
        let mut conn = tokio::time::timeout(Duration::from_secs(10), PgConnection::connect(&url))
            .await
            .map_err(|_| sqlx::Error::PoolTimedOut)??;
        sqlx::query(AssertSqlSafe(sql)).execute(&mut conn).await?;
        conn.close().await?;
        Ok(())
    })
}

fn on_own_runtime<T: Send + 'static>(
    work: impl std::future::Future<Output = Result<T, sqlx::Error>> + Send + 'static,
) -> Result<T, sqlx::Error> {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(work)
    })
    .join()
    .expect("database thread")
}
